// libdevmapper's log hook is variadic (printf-style), which Swift can neither
// implement nor call. This trampoline is that variadic function: it formats the
// message with vsnprintf and hands the finished string to a non-variadic
// callback that Swift registers. Nothing here includes libdevmapper.h; the
// Swift side passes the trampoline's address to dm_log_with_errno_init.
#pragma once

/// The Swift side of the log: level (libdevmapper's _LOG_* value with its flag
/// bits), source file and line inside libdevmapper, the errno or debug class it
/// passed, and the formatted message.
typedef void (*thinfs_dm_log_callback)(int level, const char *file, int line, int dm_errno_or_class, const char *message);

/// Registers the callback every trampoline call forwards to (NULL drops messages).
void thinfs_dm_log_set_callback(thinfs_dm_log_callback callback);

/// The address of the variadic trampoline, to pass to dm_log_with_errno_init.
/// POSIX lets a function pointer travel as a void pointer (as dlsym returns one).
const void *thinfs_dm_log_trampoline_address(void);
