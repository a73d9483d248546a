// C for what Swift cannot express. Glibc's Swift module hides the _GNU_SOURCE
// declarations, fallocate(2) among them, so they are wrapped here.
#pragma once
#include <stdint.h>

/// fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length); -1 and errno on failure.
int thinfs_punch_hole(int fd, int64_t offset, int64_t length);

/// fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length); -1 and errno on failure.
int thinfs_zero_range(int fd, int64_t offset, int64_t length);
