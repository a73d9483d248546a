internal import CRE2

/// A compiled RE2 pattern: the syntax and the linear-time guarantee of Go's regexp, which containerd
/// uses for the `~=` operator of its filters. A client's pattern can't make a List request take
/// exponential time, as it could with a backtracking engine.
final class RE2Pattern: @unchecked Sendable {
    // @unchecked: RE2's const matching methods are safe from several threads; the pointer is never
    // written after init.
    private let compiled: OpaquePointer

    struct Refused: Swift.Error {
        var reason: String
    }

    init(_ pattern: String) throws(Refused) {
        var error = [CChar](repeating: 0, count: 256)
        var utf8 = pattern
        let compiled = utf8.withUTF8 { bytes in
            bytes.withMemoryRebound(to: CChar.self) { thinfs_re2_compile($0.baseAddress, $0.count, &error, error.count) }
        }
        guard let compiled else {
            throw Refused(reason: String(decoding: error.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))
        }
        self.compiled = compiled
    }

    deinit { thinfs_re2_free(compiled) }

    /// Whether the pattern matches anywhere in `text` (Go's `MatchString`).
    func matches(_ text: String) -> Bool {
        var text = text
        return text.withUTF8 { bytes in
            bytes.withMemoryRebound(to: CChar.self) { thinfs_re2_partial_match(compiled, $0.baseAddress, $0.count) } == 1
        }
    }
}
