#include "crc32c.h"
#include <pthread.h>
#include <string.h>

// Reflected polynomial of CRC32C (iSCSI, RFC 3720).
#define POLY 0x82f63b78u

static uint32_t table[8][256];
static pthread_once_t table_once = PTHREAD_ONCE_INIT;

static void build_table(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ ((c & 1) ? POLY : 0);
        table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = table[0][i];
        for (int t = 1; t < 8; t++) {
            c = table[0][c & 0xff] ^ (c >> 8);
            table[t][i] = c;
        }
    }
}

// Slicing-by-8: eight bytes per step through eight 256-entry tables.
uint32_t thinfs_crc32c_software(uint32_t crc, const void *data, size_t len) {
    pthread_once(&table_once, build_table);
    const uint8_t *p = data;
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= crc;
        crc = table[7][w & 0xff] ^ table[6][(w >> 8) & 0xff] ^ table[5][(w >> 16) & 0xff] ^
              table[4][(w >> 24) & 0xff] ^ table[3][(w >> 32) & 0xff] ^ table[2][(w >> 40) & 0xff] ^
              table[1][(w >> 48) & 0xff] ^ table[0][w >> 56];
        p += 8;
        len -= 8;
    }
    while (len--) crc = table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__)
#include <nmmintrin.h>

// Three independent crc32 streams hide the instruction's 3-cycle latency; the
// partial results are folded with the software update of zero-extension (a
// shift by the stream length), computed here by multiplying in GF(2).
static uint32_t gf2_multiply(uint32_t a, uint32_t b) {
    // Multiply in the reflected domain modulo POLY.
    uint32_t product = 0;
    for (int i = 0; i < 32; i++) {
        if (b & 0x80000000u) product ^= a;
        b <<= 1;
        a = (a & 1) ? (a >> 1) ^ POLY : a >> 1;
    }
    return product;
}

// x^(8*n) mod P in the reflected domain: the constant that shifts a CRC over n zero bytes.
static uint32_t shift_constant(size_t n) {
    uint32_t result = 0x80000000u;       // x^0
    uint32_t square = 0x40000000u;       // x^1
    size_t bits = n * 8;
    // square starts at x^1 and is squared each round: x^1, x^2, x^4, ...
    while (bits) {
        if (bits & 1) result = gf2_multiply(result, square);
        square = gf2_multiply(square, square);
        bits >>= 1;
    }
    return result;
}

#define STRIPE 1360   // 3 * 1360 = 4080 = a metadata block after its checksum field, rounded to 8
static uint32_t shift_stripe, shift_two_stripes;
static pthread_once_t shifts_once = PTHREAD_ONCE_INIT;

static void build_shifts(void) {
    shift_stripe = shift_constant(STRIPE);
    shift_two_stripes = shift_constant(2 * STRIPE);
}

__attribute__((target("sse4.2")))
static uint32_t crc32c_hw(uint32_t crc, const void *data, size_t len) {
    const uint8_t *p = data;
    if (len >= 3 * STRIPE) {
        pthread_once(&shifts_once, build_shifts);
        while (len >= 3 * STRIPE) {
            uint64_t a = crc, b = 0, c = 0;
            for (size_t i = 0; i < STRIPE; i += 8) {
                uint64_t wa, wb, wc;
                memcpy(&wa, p + i, 8);
                memcpy(&wb, p + STRIPE + i, 8);
                memcpy(&wc, p + 2 * STRIPE + i, 8);
                a = _mm_crc32_u64(a, wa);
                b = _mm_crc32_u64(b, wb);
                c = _mm_crc32_u64(c, wc);
            }
            crc = gf2_multiply((uint32_t)a, shift_two_stripes) ^
                  gf2_multiply((uint32_t)b, shift_stripe) ^ (uint32_t)c;
            p += 3 * STRIPE;
            len -= 3 * STRIPE;
        }
    }
    uint64_t c64 = crc;
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c64 = _mm_crc32_u64(c64, w);
        p += 8;
        len -= 8;
    }
    crc = (uint32_t)c64;
    while (len--) crc = _mm_crc32_u8(crc, *p++);
    return crc;
}

int thinfs_crc32c_is_hardware(void) { return __builtin_cpu_supports("sse4.2"); }

uint32_t thinfs_crc32c(uint32_t seed, const void *data, size_t len) {
    static int hw = -1;
    int h = __atomic_load_n(&hw, __ATOMIC_RELAXED);
    if (h < 0) {
        h = __builtin_cpu_supports("sse4.2") ? 1 : 0;
        __atomic_store_n(&hw, h, __ATOMIC_RELAXED);
    }
    return h ? crc32c_hw(seed, data, len) : thinfs_crc32c_software(seed, data, len);
}
#else
int thinfs_crc32c_is_hardware(void) { return 0; }
uint32_t thinfs_crc32c(uint32_t seed, const void *data, size_t len) {
    return thinfs_crc32c_software(seed, data, len);
}
#endif
