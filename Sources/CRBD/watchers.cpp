// thinfs_rados_list_watchers: librados's IoCtx::list_watchers behind a C function. Ceph 16's C
// API has no call for an object's watchers (rados_list_watchers came with Ceph 18), and the
// only other way to them, librbd's rbd_watchers_list, needs the image open: a full rbd_open
// (ImageCtx, its config copy, a header refresh) for one question.
//
// The C++ functions come from the loader's dlsym (the library is dlopened, never linked), each
// called as the Itanium C++ ABI calls a member function: `this` as the first argument, a
// reference as a pointer. IoCtx holds one pointer (its IoCtxImpl), which from_rados_ioctx_t
// sets, taking a reference, and the destructor releases.
#include "loader.h"
#include <errno.h>
#include <list>
#include <new>
#include <stddef.h>
#include <string.h>
#include <string>

namespace {

/// Room for librados::IoCtx (one pointer in every Ceph release since 0.x); more is harmless.
struct alignas(16) IoCtxStorage {
    unsigned char bytes[64];
};

using Construct = void (*)(IoCtxStorage *self);
using Destruct = void (*)(IoCtxStorage *self);
using FromC = void (*)(rados_ioctx_t io, IoCtxStorage *into);
using ListWatchers = int (*)(IoCtxStorage *self, const std::string &oid, std::list<obj_watch_t> *out);

/// An IoCtx sharing `io` (a reference taken), released on scope exit.
class SharedIoCtx {
    const thinfs_rados_cxx &f;
public:
    IoCtxStorage storage;
    SharedIoCtx(const thinfs_rados_cxx &f, rados_ioctx_t io) : f(f) {
        memset(&storage, 0, sizeof storage);
        reinterpret_cast<Construct>(f.io_ctx_construct)(&storage);
        reinterpret_cast<FromC>(f.io_ctx_from_c)(io, &storage);
    }
    ~SharedIoCtx() { reinterpret_cast<Destruct>(f.io_ctx_destruct)(&storage); }
    SharedIoCtx(const SharedIoCtx &) = delete;
    SharedIoCtx &operator=(const SharedIoCtx &) = delete;
};

} // namespace

extern "C" int thinfs_rados_list_watchers(rados_ioctx_t io, const char *oid, struct obj_watch_t *out, size_t *max) {
    const thinfs_rados_cxx *f = thinfs_rados_cxx_loaded();
    if (!f) return -ENOSYS;
    try {
        SharedIoCtx ctx(*f, io);
        std::list<obj_watch_t> watchers;
        int rc = reinterpret_cast<ListWatchers>(f->io_ctx_list_watchers)(&ctx.storage, std::string(oid), &watchers);
        if (rc < 0) return rc;
        size_t room = *max;
        *max = watchers.size();
        if (watchers.size() > room) return -ERANGE;
        size_t i = 0;
        for (const obj_watch_t &w : watchers) out[i++] = w;
        return 0;
    } catch (const std::bad_alloc &) {
        return -ENOMEM;
    } catch (...) {
        return -EIO;
    }
}
