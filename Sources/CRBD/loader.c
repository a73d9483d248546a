// The loader behind CRBD.h: dlopen and dlsym, once per process.
#include "CRBD.h"
#include "loader.h"
#include <dlfcn.h>
#include <pthread.h>
#include <stddef.h>

static struct thinfs_rbd table;
static struct thinfs_rados_cxx cxx_table;
static const struct thinfs_rbd *loaded;
static const char *failed_library;
static const char *failed_reason;
static pthread_once_t once = PTHREAD_ONCE_INIT;

// dlerror()'s text lives in a per-thread buffer the next dl call reuses: keep a copy.
static char reason_buffer[512];

static int fail(const char *library) {
    const char *e = dlerror();
    size_t n = 0;
    if (e) for (; e[n] && n + 1 < sizeof reason_buffer; n++) reason_buffer[n] = e[n];
    reason_buffer[n] = 0;
    failed_library = library;
    failed_reason = reason_buffer;
    return 0;
}

static int load_all(void) {
    // RTLD_LOCAL: Ceph's many C++ symbols stay out of the global scope; librbd finds librados's
    // through its own DT_NEEDED. Never unloaded: librados keeps threads running.
    void *rados = dlopen("librados.so.2", RTLD_NOW | RTLD_LOCAL);
    if (!rados) return fail("librados.so.2");
    void *rbd = dlopen("librbd.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!rbd) return fail("librbd.so.1");
#define RESOLVE(handle, soname, name) \
    dlerror(); \
    table.name = (__typeof__(name) *)dlsym(handle, #name); \
    if (!table.name) return fail(soname);
#define RESOLVE_RADOS(name) RESOLVE(rados, "librados.so.2", name)
#define RESOLVE_RBD(name) RESOLVE(rbd, "librbd.so.1", name)
    THINFS_RADOS_FUNCTIONS(RESOLVE_RADOS)
    THINFS_RBD_FUNCTIONS(RESOLVE_RBD)
#define RESOLVE_RADOS_CXX(field, symbol) \
    dlerror(); \
    cxx_table.field = dlsym(rados, symbol); \
    if (!cxx_table.field) return fail("librados.so.2");
    THINFS_RADOS_CXX_FUNCTIONS(RESOLVE_RADOS_CXX)
    return 1;
}

static void load_once(void) {
    if (load_all()) loaded = &table;
}

const struct thinfs_rbd *thinfs_rbd_load(const char **library, const char **reason) {
    pthread_once(&once, load_once);
    if (!loaded) {
        *library = failed_library;
        *reason = failed_reason;
    }
    return loaded;
}

const struct thinfs_rados_cxx *thinfs_rados_cxx_loaded(void) {
    pthread_once(&once, load_once);
    return loaded ? &cxx_table : NULL;
}
