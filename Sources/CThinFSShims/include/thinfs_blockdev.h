// Block-device calls Swift cannot make directly: ioctl(2) is variadic, and
// O_DIRECT is a _GNU_SOURCE macro Glibc's Swift module hides. The loop
// device's structures and request numbers come from <linux/loop.h>.
#pragma once
#include <stdint.h>
#include <linux/loop.h>

/// ioctl(fd, request, arg) with an integer argument; -1 and errno on failure.
int thinfs_ioctl_value(int fd, unsigned long request, unsigned long arg);

/// ioctl(fd, request, arg) with a pointer argument; -1 and errno on failure.
int thinfs_ioctl_pointer(int fd, unsigned long request, void *arg);

/// open(path, flags | O_DIRECT | O_CLOEXEC); -1 and errno on failure.
int thinfs_open_direct(const char *path, int flags);

/// The size in bytes of a block device (BLKGETSIZE64) or regular file; -1 and errno on failure.
int64_t thinfs_device_size(int fd);
