// CRBD: librados and librbd (Ceph RBD), loaded with dlopen on first use.
//
// Only a store with thinfs.backend=rbd needs Ceph's client libraries, and they are heavy: linked
// into thinfs they brought about a dozen shared libraries (libceph-common, boost, ibverbs, ...) and
// their symbol lookups to every process start, `thinfs --version` included. So nothing links
// them: thinfs_rbd_load() dlopens librados.so.2 and librbd.so.1 once and fills a table of the
// functions ThinFS calls (each typed from the library's own header, so a signature cannot drift).
// The one Swift module importing this one calls them as `ceph.rbd_open(...)`; a call written
// as plain `rbd_open(...)` fails to link, so nothing can bypass the loader.
#pragma once
#include <rados/librados.h>
#include <rbd/librbd.h>

#pragma clang assume_nonnull begin

// Every function ThinFS calls, X(name) each. Add a function here to call it from Swift.
#define THINFS_RADOS_FUNCTIONS(X) \
    X(rados_cluster_stat) \
    X(rados_conf_read_file) \
    X(rados_conf_set) \
    X(rados_connect) \
    X(rados_create2) \
    X(rados_create_read_op) \
    X(rados_create_write_op) \
    X(rados_get_instance_id) \
    X(rados_ioctx_create) \
    X(rados_ioctx_destroy) \
    X(rados_lock_exclusive) \
    X(rados_omap_get_end) \
    X(rados_omap_get_next2) \
    X(rados_read) \
    X(rados_read_op_omap_get_vals2) \
    X(rados_read_op_operate) \
    X(rados_release_read_op) \
    X(rados_release_write_op) \
    X(rados_shutdown) \
    X(rados_stat) \
    X(rados_unlock) \
    X(rados_write_op_create) \
    X(rados_write_op_omap_rm_keys2) \
    X(rados_write_op_omap_set2) \
    X(rados_write_op_operate) \

#define THINFS_RBD_FUNCTIONS(X) \
    X(rbd_aio_create_completion) \
    X(rbd_aio_discard) \
    X(rbd_aio_flush) \
    X(rbd_aio_get_return_value) \
    X(rbd_aio_read) \
    X(rbd_aio_release) \
    X(rbd_aio_wait_for_complete) \
    X(rbd_aio_write) \
    X(rbd_clone3) \
    X(rbd_close) \
    X(rbd_create4) \
    X(rbd_diff_iterate2) \
    X(rbd_flush) \
    X(rbd_get_create_timestamp) \
    X(rbd_get_parent) \
    X(rbd_get_size) \
    X(rbd_image_options_create) \
    X(rbd_image_options_destroy) \
    X(rbd_image_options_set_uint64) \
    X(rbd_image_spec_list_cleanup) \
    X(rbd_linked_image_spec_cleanup) \
    X(rbd_linked_image_spec_list_cleanup) \
    X(rbd_list2) \
    X(rbd_list_children3) \
    X(rbd_lock_acquire) \
    X(rbd_lock_get_owners) \
    X(rbd_lock_get_owners_cleanup) \
    X(rbd_open) \
    X(rbd_open_read_only) \
    X(rbd_pool_metadata_get) \
    X(rbd_pool_metadata_set) \
    X(rbd_remove) \
    X(rbd_rename) \
    X(rbd_resize) \
    X(rbd_snap_create) \
    X(rbd_snap_exists) \
    X(rbd_snap_is_protected) \
    X(rbd_snap_list) \
    X(rbd_snap_list_end) \
    X(rbd_snap_protect) \
    X(rbd_snap_remove) \
    X(rbd_snap_set) \
    X(rbd_snap_spec_cleanup) \
    X(rbd_snap_unprotect) \
    X(rbd_version) \

// librados's C++ API, for what its C API of Ceph 16 lacks: the watchers of an object (C's
// rados_list_watchers came with Ceph 18). X(field, symbol): the mangled names of
// librados::IoCtx's constructor, destructor, from_rados_ioctx_t and list_watchers in librados's
// ABI namespace librados::v14_2_0 (symbol version LIBRADOS_14.2.0, the one since Ceph 14). No
// header declares them to C: watchers.cpp gives them their types and calls them.
#define THINFS_RADOS_CXX_FUNCTIONS(X) \
    X(io_ctx_construct, "_ZN8librados7v14_2_05IoCtxC1Ev") \
    X(io_ctx_destruct, "_ZN8librados7v14_2_05IoCtxD1Ev") \
    X(io_ctx_from_c, "_ZN8librados7v14_2_05IoCtx18from_rados_ioctx_tEPvRS1_") \
    X(io_ctx_list_watchers, "_ZN8librados7v14_2_05IoCtx13list_watchersERKNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEEEPNS2_4listI11obj_watch_tSaISB_EEE") \

#define THINFS_RBD_FIELD(name) __typeof__(name) *name;
/// The loaded functions, each named as in librados.h and librbd.h.
struct thinfs_rbd {
    THINFS_RADOS_FUNCTIONS(THINFS_RBD_FIELD)
    THINFS_RBD_FUNCTIONS(THINFS_RBD_FIELD)
};
#undef THINFS_RBD_FIELD

/// The watchers of object `oid` in the pool of `io` (librados's IoCtx::list_watchers): fills up
/// to *max entries of `out` and sets *max to their number. Returns 0; -ERANGE when there are more
/// than *max (*max is then the number needed); -ENOENT when the object does not exist; another
/// -errno on failure. Only after thinfs_rbd_load succeeded.
int thinfs_rados_list_watchers(rados_ioctx_t io, const char *oid, struct obj_watch_t *out, size_t *max);

/// Loads librados.so.2 and librbd.so.1 and resolves every function, once per process (later calls
/// return the first one's result). Returns the table, or NULL with *library set to the soname that
/// failed and *reason to dlerror()'s text (static strings, valid for the process's life).
const struct thinfs_rbd *_Nullable thinfs_rbd_load(const char *_Nullable *_Nonnull library,
                                                   const char *_Nullable *_Nonnull reason);

#pragma clang assume_nonnull end
