import Foundation
import ThinFS

/// Tars made with the project's own `ArchiveWriter` (libarchive, pax): the harnesses' fixed
/// setup (the lower layer) and the files of the `image` harness.
enum TarWriter {
    struct Entry {
        var path: String
        var contents: [UInt8]
        var kind: ArchiveEntry.Kind
        /// A name ending in "/" is a directory.
        init(_ path: String, _ contents: String) {
            self.path = path.hasSuffix("/") ? String(path.dropLast()) : path
            self.contents = Array(contents.utf8)
            kind = path.hasSuffix("/") ? .directory : .regular
        }
        init(path: String, bytes: [UInt8]) {
            self.path = path
            contents = bytes
            kind = .regular
        }
    }

    static func tar(_ entries: [Entry]) throws -> [UInt8] {
        // A pipe would need a reader thread; a temporary file is simpler.
        let path = NSTemporaryDirectory() + "/thinfs-fuzz-tar-\(getpid())"
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0o600)
        guard fd >= 0 else { throw CocoaError(.fileWriteUnknown) }
        defer { close(fd); unlink(path) }
        let writer = try ArchiveWriter(fd: fd, name: path)
        for e in entries {
            let isDir = e.kind == .directory
            try writer.writeHeader(ArchiveEntry(path: e.path, kind: e.kind, permissions: isDir ? 0o755 : 0o644,
                                                size: isDir ? 0 : UInt64(e.contents.count)))
            if !isDir { try e.contents.withUnsafeBytes { try writer.writeData($0) } }
        }
        try writer.finish()
        return [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
    }
}

/// Several named files in one input, so that the fuzzer edits names and contents directly (no
/// tar checksums in the way):
///
///     name \n contents \0\0\n name \n contents ...
///
/// The separator is `\0\0\n`; a name ends at the first newline.
public enum FileBundle {
    public static let separator: [UInt8] = [0, 0, 10]

    public static func decode(_ data: UnsafeRawBufferPointer) -> [(name: String, contents: [UInt8])] {
        let bytes = Array(data)
        var files: [(String, [UInt8])] = []
        var start = 0
        func add(_ part: ArraySlice<UInt8>) {
            guard let newline = part.firstIndex(of: 10) else { return }
            files.append((String(decoding: part[part.startIndex ..< newline], as: UTF8.self), Array(part[(newline + 1)...])))
        }
        var i = 0
        while i + 3 <= bytes.count {
            if bytes[i] == 0 && bytes[i + 1] == 0 && bytes[i + 2] == 10 {
                add(bytes[start ..< i])
                i += 3
                start = i
            } else {
                i += 1
            }
        }
        add(bytes[start...])
        return files
    }

    public static func encode(_ files: [(String, [UInt8])]) -> [UInt8] {
        var out: [UInt8] = []
        for (i, (name, contents)) in files.enumerated() {
            if i > 0 { out += separator }
            out += Array(name.utf8) + [10] + contents
        }
        return out
    }

    /// Writes the files under `root`. The harness is the one writing here, not the code under
    /// test, so names are kept inside `root` (components "..", "." and empty are dropped).
    public static func write(_ files: [(name: String, contents: [UInt8])], under root: String) {
        for (name, contents) in files {
            let parts = name.split(separator: "/").filter { $0 != ".." && $0 != "." && !$0.isEmpty && !$0.contains("\0") }
            guard !parts.isEmpty else { continue }
            let path = root + "/" + parts.joined(separator: "/")
            try? FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            _ = FileManager.default.createFile(atPath: path, contents: Data(contents))
        }
    }
}
