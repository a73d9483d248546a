// RE2 behind a C API, so that Swift can use it without C++ interoperability.
//
// containerd's filter syntax (`labels.x~=PATTERN`) compiles its patterns with Go's regexp, which is
// RE2's syntax and RE2's guarantee: matching is linear in the text, whatever the pattern. RE2 gives
// ThinFS the same syntax and the same bound (NSRegularExpression, ICU, backtracks).
#ifndef THINFS_RE2_H
#define THINFS_RE2_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct thinfs_re2 thinfs_re2;

/// Compiles `pattern` (`length` bytes of UTF-8). Returns NULL when RE2 refuses it, with RE2's reason
/// in `error` (NUL-terminated, truncated to `error_capacity`).
thinfs_re2 *thinfs_re2_compile(const char *pattern, size_t length, char *error, size_t error_capacity);

/// 1 when the pattern matches anywhere in `text` (Go's `MatchString`), 0 otherwise. Safe to call from
/// several threads at once on one compiled pattern.
int thinfs_re2_partial_match(const thinfs_re2 *re, const char *text, size_t length);

void thinfs_re2_free(thinfs_re2 *re);

#ifdef __cplusplus
}
#endif

#endif
