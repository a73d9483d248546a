// C for what Swift cannot express. Glibc's Swift module hides the _GNU_SOURCE
// declarations, fallocate(2) among them, so they are wrapped here.
#pragma once
#include <stdint.h>

/// fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length); -1 and errno on failure.
int thinfs_punch_hole(int fd, int64_t offset, int64_t length);

/// fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length); -1 and errno on failure.
int thinfs_zero_range(int fd, int64_t offset, int64_t length);

/// lseek(fd, offset, SEEK_DATA): the next data at or after offset; -1 with ENXIO past the last.
int64_t thinfs_seek_data(int fd, int64_t offset);

/// lseek(fd, offset, SEEK_HOLE): the next hole at or after offset (end of file counts as one).
int64_t thinfs_seek_hole(int fd, int64_t offset);

/// syncfs(fd): writes back the filesystem of fd, as every mount of it sees it; -1 and errno on failure.
int thinfs_syncfs(int fd);
