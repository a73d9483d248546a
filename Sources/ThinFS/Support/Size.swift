/// Byte sizes with the K/M/G/T suffixes the CLI accepts (powers of 1024, as lvm and Docker use).
public enum ByteSize {
    public struct ParseError: Error, CustomStringConvertible {
        public let text: String
        public var description: String { "'\(text)' is not a size: use a number with an optional K, M, G or T suffix (powers of 1024)" }
    }

    public static func parse(_ text: String) throws(ParseError) -> UInt64 {
        var digits = Substring(text)
        var shift: UInt64 = 0
        // An optional "B" or "iB" after the unit letter ("64K", "64KiB", "64KB"), or "B" alone.
        if digits.hasSuffix("iB") || digits.hasSuffix("ib") { digits = digits.dropLast(2) } else if digits.last == "B" || digits.last == "b" { digits = digits.dropLast() }
        if let unit = digits.last, !unit.isNumber {
            switch unit.uppercased() {
            case "K": shift = 10
            case "M": shift = 20
            case "G": shift = 30
            case "T": shift = 40
            default: throw ParseError(text: text)
            }
            digits = digits.dropLast()
        }
        guard !digits.isEmpty, digits.allSatisfy(\.isNumber), let n = UInt64(digits), n <= UInt64.max >> shift else {
            throw ParseError(text: text)
        }
        return n << shift
    }

    /// A size in the largest unit that divides it, e.g. 65536 -> "64K".
    public static func format(_ bytes: UInt64) -> String {
        for (unit, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] as [(String, UInt64)]
        where bytes >= 1 << shift && bytes % (1 << shift) == 0 {
            return "\(bytes >> shift)\(unit)"
        }
        return "\(bytes)"
    }

    /// Docker-style human size with two decimals, e.g. "1.07 GB" (decimal units, as `docker info` prints).
    public static func human(_ bytes: UInt64) -> String {
        let units = ["B", "kB", "MB", "GB", "TB", "PB"]
        var value = Double(bytes)
        var i = 0
        while value >= 1000 && i < units.count - 1 {
            value /= 1000
            i += 1
        }
        let rounded = (value * 100).rounded() / 100
        return i == 0 ? "\(bytes) B" : "\(rounded) \(units[i])"
    }
}
