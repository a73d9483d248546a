import Foundation

/// e2fsprogs' programs (mke2fs, e2fsck, resize2fs), run to completion: what libext2fs offers
/// as programs rather than calls.
enum E2fsprogs {
    struct NotRunnable: Error, CustomStringConvertible {
        var path: String
        var underlying: Error
        var description: String { "cannot run \(path) (install e2fsprogs): \(underlying)" }
    }

    /// Runs `path` with `arguments` and no stdin; returns its exit status and its stdout and
    /// stderr together, trimmed (one pipe for both, so neither can fill up and stall it).
    static func run(_ path: String, _ arguments: [String]) throws(NotRunnable) -> (status: Int32, output: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: path)
        p.arguments = arguments
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        p.standardInput = FileHandle.nullDevice
        do { try p.run() } catch { throw NotRunnable(path: path, underlying: error) }
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines))
    }
}
