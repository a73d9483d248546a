import Foundation
import Logging
import ThinFS

/// `image`: OCI image layouts and `docker save` archives, opened with `ImageSource` (index,
/// manifests, configs, digests), then each layer verified and read entry by entry.
///
/// Input: one mode byte, then a `FileBundle`:
///
///     0  the files as an OCI layout directory
///     1  the files as an unpacked docker save directory
///     2  the files packed into a docker save tar (names as given, "../x" included)
///     3  the bytes after the mode byte are the archive itself (tar, gzip...)
public enum ImageHarness {
    static let quiet = Logger(label: "thinfs.fuzz", factory: { _ in SwiftLogNoOpLogHandler() })
    static let scratch = Harness.scratchDirectory("image")

    /// Makes the fixed part once, before the first input.
    public static func prepare() { _ = scratch }

    public static func run(_ data: UnsafeRawBufferPointer) {
        guard let mode = data.first else { return }
        let rest = UnsafeRawBufferPointer(rebasing: data.dropFirst())
        let work = scratch + "/work"
        try? FileManager.default.removeItem(atPath: work)
        try? FileManager.default.createDirectory(atPath: work + "/tmp", withIntermediateDirectories: true)
        let path: String
        switch mode % 4 {
        case 0, 1:
            path = work + "/image"
            try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
            FileBundle.write(FileBundle.decode(rest), under: path)
        case 2:
            path = work + "/image.tar"
            let files = FileBundle.decode(rest).map { TarWriter.Entry(path: $0.name, bytes: $0.contents) }
            guard let tar = try? TarWriter.tar(files) else { return }
            _ = FileManager.default.createFile(atPath: path, contents: Data(tar))
        default:
            path = work + "/image.tar"
            _ = FileManager.default.createFile(atPath: path, contents: Data(rest))
        }
        guard let image = try? ImageSource(path: path, temporaryDirectory: work + "/tmp", logger: quiet) else { return }
        _ = image.topChainID
        for layer in image.layers.prefix(4) {
            _ = try? image.verify(layer)
            guard let reader = try? image.open(layer) else { continue }
            var n = 0
            while n < 1000, let entry = try? reader.next() {
                n += 1
                if entry.kind == .regular, entry.size < 1 << 20 { _ = try? reader.readAll(limit: 1 << 20) }
            }
        }
    }
}
