// Shared by the FUSE server (finding its own mount), kernel-mount mode and the daemon's
// stale-mount sweep, so it lives below all three.

/// /proc/self/mountinfo, as proc(5) describes it:
///
///     36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
///     (1)(2)(3)   (4)   (5)      (6)      (7)   (8) (9)   (10)         (11)
///
/// (3) is the device's major:minor, (5) the mount point with space, tab, newline and
/// backslash escaped as octal (\040), (9) the filesystem type and (10) the source.
package struct MountTable {
    package struct Entry: Equatable {
        package struct Device: Equatable {
            package var major: UInt32
            package var minor: UInt32
        }
        package var device: Device
        package var mountPoint: String
        package var type: String
        package var source: String
    }

    package var entries: [Entry]

    package static func current() -> [Entry] {
        guard let text = ProcFile.read("/proc/self/mountinfo") else { return [] }
        return parse(text)
    }

    package static func parse(_ text: String) -> [Entry] {
        text.split(separator: "\n").compactMap { line in
            let fields = line.split(separator: " ", omittingEmptySubsequences: false)
            guard fields.count >= 10, let dash = fields.firstIndex(of: "-"), dash + 2 < fields.count else { return nil }
            let mm = fields[2].split(separator: ":")
            guard mm.count == 2, let major = UInt32(mm[0]), let minor = UInt32(mm[1]) else { return nil }
            return Entry(device: .init(major: major, minor: minor), mountPoint: unescape(fields[4]),
                         type: String(fields[dash + 1]), source: unescape(fields[dash + 2]))
        }
    }

    /// Undoes the kernel's octal escapes (`\040` is a space).
    package static func unescape(_ field: Substring) -> String {
        var bytes: [UInt8] = []
        let utf8 = Array(field.utf8)
        var i = 0
        while i < utf8.count {
            if utf8[i] == UInt8(ascii: "\\"), i + 3 < utf8.count,
               let v = UInt8(String(decoding: utf8[(i + 1)...(i + 3)], as: UTF8.self), radix: 8) {
                bytes.append(v)
                i += 4
            } else {
                bytes.append(utf8[i])
                i += 1
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}

extension Array where Element == MountTable.Entry {
    package func entry(at mountPoint: String) -> MountTable.Entry? { last(where: { $0.mountPoint == mountPoint }) }
}
