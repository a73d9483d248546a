#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include "thinfs_dm_log.h"

static _Atomic(thinfs_dm_log_callback) registered;

void thinfs_dm_log_set_callback(thinfs_dm_log_callback callback) {
    atomic_store(&registered, callback);
}

// Matches libdevmapper's dm_log_with_errno_fn:
// void (*)(int level, const char *file, int line, int dm_errno_or_class, const char *f, ...)
__attribute__((format(printf, 5, 6)))
static void trampoline(int level, const char *file, int line, int dm_errno_or_class, const char *f, ...) {
    thinfs_dm_log_callback callback = atomic_load(&registered);
    if (!callback) return;
    // libdevmapper's own messages are one line; longer ones are cut, never overflow.
    char message[1024];
    va_list ap;
    va_start(ap, f);
    vsnprintf(message, sizeof message, f, ap);
    va_end(ap);
    callback(level, file, line, dm_errno_or_class, message);
}

const void *thinfs_dm_log_trampoline_address(void) { return (const void *)trampoline; }
