import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// What every harness shares: the libFuzzer entry points call `Harness.run`, and
/// `THINFS_FUZZ_WRITE_SEEDS=DIR` makes a harness binary write its seed corpus to DIR and exit
/// (`Fuzz/make-seeds.sh` runs each one so).
///
/// A harness catches every thrown error: bad input must end in a typed error. What it looks for
/// is a trap (precondition, overflow, out-of-range index, force unwrap), a sanitizer report, a
/// hang (libFuzzer's -timeout) or runaway memory (-rss_limit_mb / -malloc_limit_mb).
public enum Harness {
    /// Writes `seeds` (name, bytes) to `$THINFS_FUZZ_WRITE_SEEDS` and exits, when the variable is set.
    public static func writeSeedsIfAsked(_ seeds: () throws -> [(String, [UInt8])]) {
        guard let dir = ProcessInfo.processInfo.environment["THINFS_FUZZ_WRITE_SEEDS"] else { return }
        do {
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            for (name, bytes) in try seeds() {
                try Data(bytes).write(to: URL(fileURLWithPath: dir + "/" + name))
            }
            exit(0)
        } catch {
            FileHandle.standardError.write(Data("cannot write the seeds to \(dir): \(error)\n".utf8))
            exit(1)
        }
    }

    /// A failure of the harness's own setup (not of the code under test): stop with its reason.
    public static func setupFailed(_ what: String, _ error: Error) -> Never {
        FileHandle.standardError.write(Data("fuzz harness setup failed: \(what): \(error)\n".utf8))
        exit(2)
    }

    /// A fresh private directory under /dev/shm (memory) when there is one, else the temporary directory.
    public static func scratchDirectory(_ label: String) -> String {
        let base = FileManager.default.fileExists(atPath: "/dev/shm") ? "/dev/shm" : NSTemporaryDirectory()
        let path = base + "/thinfs-fuzz-\(label)-\(getpid())"
        try? FileManager.default.removeItem(atPath: path)
        do { try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true) } catch {
            setupFailed("creating \(path)", error)
        }
        // A harness run ends in exit() from libFuzzer, so no deinit would remove it.
        atexit { ScratchCleanup.run() }
        ScratchCleanup.paths.withLock { $0.append(path) }
        return path
    }
}

enum ScratchCleanup {
    static let paths = Mutex<[String]>([])
    static func run() { for p in paths.withLock({ $0 }) { try? FileManager.default.removeItem(atPath: p) } }
}

/// A tiny lock, so that Foundation's NSLock does not leak into every harness's state.
public final class Mutex<Value>: @unchecked Sendable {
    private var value: Value
    private let lock = NSLock()
    public init(_ value: Value) { self.value = value }
    public func withLock<T>(_ body: (inout Value) throws -> T) rethrows -> T {
        lock.lock()
        defer { lock.unlock() }
        return try body(&value)
    }
}

// MARK: The driver

/// libFuzzer's driver (FuzzerDriver.cpp), called from each harness's main.swift.
///
/// SwiftPM links an executable target with `--defsym main=<target>_main` (its entry point renamed,
/// so that tests can link the module), which leaves libFuzzer's own `main` out. Each harness's
/// main.swift therefore defines `<target>_main` with `@_cdecl` (the package is compiled with
/// -parse-as-library, so top-level code is not an option) and hands its callback to the driver.
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(_ argc: UnsafeMutablePointer<CInt>,
                         _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>,
                         _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt) -> CInt

/// `THINFS_FUZZ_EXPORT=FILE`: a metadata harness writes the metadata image it built from its
/// input to FILE (zero blocks at the end left off), for a regression test to check in.
let exportPath = ProcessInfo.processInfo.environment["THINFS_FUZZ_EXPORT"]
nonisolated(unsafe) var exportHandler: ((ImageMetadataStorage) -> Void)?

func exportMetadata(into path: String, _ storage: ImageMetadataStorage) {
    var image = storage.image
    while image.count >= 4096, image.suffix(4096).allSatisfy({ $0 == 0 }) { image.removeLast(4096) }
    FileManager.default.createFile(atPath: path, contents: Data(image))
    FileHandle.standardError.write(Data("wrote the metadata image (\(image.count / 4096) blocks) to \(path)\n".utf8))
    exit(0)
}

/// The harness's input handler; set once by `Harness.main` before the driver starts.
nonisolated(unsafe) private var handler: (UnsafeRawBufferPointer) -> Void = { _ in }

extension Harness {
    /// Runs libFuzzer with `run` as the harness, after `setup` (once), with the process's arguments.
    /// `seeds` are what `THINFS_FUZZ_WRITE_SEEDS` writes (harnesses whose seeds come from
    /// make-seeds.py have none).
    public static func main(seeds: () throws -> [(String, [UInt8])] = { [] }, setup: () -> Void = {},
                            run: @escaping (UnsafeRawBufferPointer) -> Void) -> Never {
        writeSeedsIfAsked(seeds)
        setup()
        if let export = exportPath { exportHandler = { exportMetadata(into: export, $0) } }
        handler = run
        var argc = CommandLine.argc
        var argv = CommandLine.unsafeArgv
        let rc = LLVMFuzzerRunDriver(&argc, &argv) { data, size in
            handler(UnsafeRawBufferPointer(start: data, count: size))
            return 0
        }
        exit(rc)
    }
}

// MARK: - Unix sockets, for the harnesses that talk to a server

extension Harness {
    /// A stream socket connected to the unix socket at `path`. The server is the harness's own,
    /// so a failure is a setup failure.
    static func connect(unixSocket path: String) -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { setupFailed("socket", CocoaError(.fileWriteUnknown)) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in path.utf8.enumerated() { raw[i] = b }
        }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else {
            close(fd)
            setupFailed("connect \(path)", CocoaError(.fileReadUnknown))
        }
        return fd
    }

    /// Sends `bytes` until all are sent or the server closes (it may answer early, a bad request,
    /// and close). libFuzzer's -timeout alarm (SIGALRM, every second) interrupts a blocked call:
    /// EINTR is retried.
    static func send(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) {
        var done = 0
        while done < bytes.count {
            let n = Glibc.send(fd, bytes.baseAddress! + done, bytes.count - done, Int32(MSG_NOSIGNAL))
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            done += n
        }
    }

    /// Everything the server writes until it closes, retrying EINTR as `send` does.
    static func receiveAll(_ fd: Int32) -> [UInt8] {
        var response = [UInt8]()
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            response += chunk[0 ..< n]
        }
        return response
    }
}
