#define _GNU_SOURCE
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <linux/fs.h>
#include "thinfs_blockdev.h"

int thinfs_ioctl_value(int fd, unsigned long request, unsigned long arg) { return ioctl(fd, request, arg); }

int thinfs_ioctl_pointer(int fd, unsigned long request, void *arg) { return ioctl(fd, request, arg); }

int thinfs_open_direct(const char *path, int flags) { return open(path, flags | O_DIRECT | O_CLOEXEC); }

int64_t thinfs_device_size(int fd) {
    struct stat st;
    if (fstat(fd, &st) != 0) return -1;
    if (!S_ISBLK(st.st_mode)) return st.st_size;
    uint64_t size = 0;
    if (ioctl(fd, BLKGETSIZE64, &size) != 0) return -1;
    return (int64_t)size;
}
