// The loader's table of librados C++ functions, for watchers.cpp: not part of CRBD's interface.
#pragma once

#ifdef __cplusplus
extern "C" {
#endif

#include "CRBD.h"

#define THINFS_RADOS_CXX_FIELD(name, symbol) void *name;
/// librados C++ functions as untyped addresses; watchers.cpp gives each its type.
struct thinfs_rados_cxx {
    THINFS_RADOS_CXX_FUNCTIONS(THINFS_RADOS_CXX_FIELD)
};
#undef THINFS_RADOS_CXX_FIELD

/// Filled by thinfs_rbd_load (with the C functions, or not at all): NULL until it succeeded.
const struct thinfs_rados_cxx *thinfs_rados_cxx_loaded(void);

#ifdef __cplusplus
}
#endif
