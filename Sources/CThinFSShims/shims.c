#define _GNU_SOURCE
#include <fcntl.h>
#include "thinfs_shims.h"

int thinfs_punch_hole(int fd, int64_t offset, int64_t length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
}

int thinfs_zero_range(int fd, int64_t offset, int64_t length) {
    return fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length);
}

#include <unistd.h>

int64_t thinfs_seek_data(int fd, int64_t offset) { return lseek(fd, offset, SEEK_DATA); }

int64_t thinfs_seek_hole(int fd, int64_t offset) { return lseek(fd, offset, SEEK_HOLE); }

int thinfs_syncfs(int fd) { return syncfs(fd); }
