#include "thinfs_re2.h"

#include <re2/re2.h>

#include <cstdio>
#include <new>
#include <string>

struct thinfs_re2 {
    re2::RE2 re;
    thinfs_re2(re2::StringPiece pattern, const re2::RE2::Options &options) : re(pattern, options) {}
};

extern "C" thinfs_re2 *thinfs_re2_compile(const char *pattern, size_t length, char *error, size_t error_capacity) {
    re2::RE2::Options options;
    options.set_log_errors(false);  // the caller reports the error, with the filter it came from
    auto *compiled = new (std::nothrow) thinfs_re2(re2::StringPiece(pattern, length), options);
    if (compiled == nullptr) {
        if (error_capacity > 0) std::snprintf(error, error_capacity, "out of memory");
        return nullptr;
    }
    if (!compiled->re.ok()) {
        if (error_capacity > 0) std::snprintf(error, error_capacity, "%s", compiled->re.error().c_str());
        delete compiled;
        return nullptr;
    }
    return compiled;
}

extern "C" int thinfs_re2_partial_match(const thinfs_re2 *re, const char *text, size_t length) {
    return re2::RE2::PartialMatch(re2::StringPiece(text, length), re->re) ? 1 : 0;
}

extern "C" void thinfs_re2_free(thinfs_re2 *re) { delete re; }
