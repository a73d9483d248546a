import Foundation
import Logging
import ThinFS

/// `layer-tar`: the input is a layer tar (any dialect and compression libarchive reads), applied
/// with `LayerApplier` to a Volume over a copy of a small ext4 image that already holds a lower
/// layer's files (so whiteouts, opaque directories, hard links and replacements meet real
/// entries). The tree is walked afterwards. With `THINFS_FUZZ_E2FSCK=1`, e2fsck -fn checks
/// every result too (slow: for long runs).
public enum LayerTarHarness {
    static let quiet = Logger(label: "thinfs.fuzz", factory: { _ in SwiftLogNoOpLogHandler() })

    /// The lower layer the image holds before each input is applied.
    static let lowerFiles: [(String, String)] = [
        ("etc/", ""), ("etc/hostname", "base\n"), ("etc/passwd", "root:x:0:0::/root:/bin/sh\n"),
        ("bin/", ""), ("bin/sh", "#!binary\n"), ("usr/", ""), ("usr/lib/", ""), ("usr/lib/libc.so", String(repeating: "x", count: 9000)),
        ("var/", ""), ("var/cache/", ""), ("var/cache/a", "a"), ("var/cache/b", "b"),
    ]

    struct Setup {
        let image: [UInt8]
        let scratch: String
        let e2fsck: String?
    }

    static let setup: Setup = {
        let scratch = Harness.scratchDirectory("layer-tar")
        let path = scratch + "/base.img"
        guard let mkfs = findProgram("mke2fs", "mkfs.ext4") else { Harness.setupFailed("mke2fs", CocoaError(.fileNoSuchFile)) }
        do {
            _ = FileManager.default.createFile(atPath: path, contents: nil)
            let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
            try handle.truncate(atOffset: 16 << 20)
            try handle.close()
            let r = try runProgram(mkfs, ["-q", "-F", "-t", "ext4", "-b", "4096", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", path])
            guard r.status == 0 else { throw CocoaError(.fileWriteUnknown, userInfo: [NSDebugDescriptionErrorKey: r.output]) }
            let device = MemoryBlockDevice(base: [UInt8](try Data(contentsOf: URL(fileURLWithPath: path))))
            let volume = try Volume(device: device, readOnly: false, logger: quiet)
            let tar = scratch + "/lower.tar"
            _ = try FileManager.default.createFile(atPath: tar, contents: Data(TarWriter.tar(lowerFiles.map { TarWriter.Entry($0.0, $0.1) })))
            try LayerApplier(volume: volume, logger: quiet).apply(path: tar)
            try volume.fsync(nil)
            try volume.close()
            let e2fsck = ProcessInfo.processInfo.environment["THINFS_FUZZ_E2FSCK"] == "1" ? findProgram("e2fsck") : nil
            return Setup(image: device.contents, scratch: scratch, e2fsck: e2fsck)
        } catch {
            Harness.setupFailed("making the ext4 image", error)
        }
    }()

    /// Makes the fixed part once, before the first input.
    public static func prepare() { _ = setup }

    public static func run(_ data: UnsafeRawBufferPointer) {
        let s = setup
        let tar = s.scratch + "/input.tar"
        guard FileManager.default.createFile(atPath: tar, contents: Data(data)) else { Harness.setupFailed("writing \(tar)", CocoaError(.fileWriteUnknown)) }
        let device = MemoryBlockDevice(base: s.image)
        guard let volume = try? Volume(device: device, readOnly: false, logger: quiet) else { Harness.setupFailed("opening the image", CocoaError(.fileReadUnknown)) }
        _ = try? LayerApplier(volume: volume, logger: quiet).apply(path: tar)
        walk(volume, volume.rootInode, depth: 0)
        _ = try? volume.fsync(nil)
        _ = try? volume.close()
        if let e2fsck = s.e2fsck { check(device, e2fsck: e2fsck, scratch: s.scratch) }
    }

    /// Reads back every entry (bounded), as a mount would.
    static func walk(_ volume: Volume, _ ino: UInt64, depth: Int) {
        guard depth < 16 else { return }
        var entries: [DirectoryEntry] = []
        try? volume.readdir(ino, after: 0) { e in
            if e.name != "." && e.name != ".." { entries.append(e) }
            return entries.count < 256
        }
        for e in entries {
            guard let a = try? volume.getattr(e.ino) else { continue }
            _ = try? volume.listxattr(e.ino)
            switch a.mode & 0o170000 {
            case 0o040000: walk(volume, e.ino, depth: depth + 1)
            case 0o120000: _ = try? volume.readlink(e.ino)
            case 0o100000:
                var buffer = [UInt8](repeating: 0, count: 8192)
                _ = try? buffer.withUnsafeMutableBytes { try volume.read(e.ino, at: 0, into: $0) }
            default: break
            }
        }
    }

    /// The e2fsck oracle: an applied layer must leave a consistent filesystem.
    static func check(_ device: MemoryBlockDevice, e2fsck: String, scratch: String) {
        let path = scratch + "/check.img"
        _ = FileManager.default.createFile(atPath: path, contents: Data(device.contents))
        guard let r = try? runProgram(e2fsck, ["-fn", path]) else { return }
        if r.status != 0 {
            FileHandle.standardError.write(Data("e2fsck -fn failed after the layer was applied:\n\(r.output)\n".utf8))
            abort()
        }
    }
}
