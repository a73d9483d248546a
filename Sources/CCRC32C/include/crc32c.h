// CRC32C (Castagnoli), the checksum of every dm-thin metadata block.
//
// Swift has no access to the SSE4.2 `crc32` instruction, so this one function
// lives in C. The value is the kernel's `crc32c(seed, data, len)`: the raw
// reflected update with no final inversion (lib/libcrc32c.c). dm-persistent-data
// calls it with seed 0xffffffff and xors the result with a per-block-type salt.
#pragma once
#include <stddef.h>
#include <stdint.h>

/// Updates `seed` over `len` bytes, with the hardware instruction when the CPU has it.
uint32_t thinfs_crc32c(uint32_t seed, const void *data, size_t len);

/// The portable table-driven path, always in software (for tests and benchmarks).
uint32_t thinfs_crc32c_software(uint32_t seed, const void *data, size_t len);

/// 1 when `thinfs_crc32c` uses the SSE4.2 instruction.
int thinfs_crc32c_is_hardware(void);
