import Foundation
import Logging
import Synchronization
import SystemPackage
import TestSupport
import Testing
@testable import ThinFS
#if canImport(Glibc)
import Glibc
#endif

/// libc calls that the Glibc module hides behind _GNU_SOURCE or leaves out (sys/xattr.h),
/// found with dlsym.
enum LibC {
    static let seekData: Int32 = 3, seekHole: Int32 = 4            // lseek(2)
    static let keepSize: Int32 = 1, punchHole: Int32 = 2            // fallocate(2)
    static let tmpfile: Int32 = 0o20000000 | O_DIRECTORY            // open(2): __O_TMPFILE | O_DIRECTORY
    static let renameNoReplace: UInt32 = 1, renameExchange: UInt32 = 2, renameWhiteout: UInt32 = 4  // rename(2)
    static let xattrCreate: Int32 = 1, xattrReplace: Int32 = 2      // setxattr(2)
    static let utimeNow = (1 << 30) - 1                              // utimensat(2)

    private static func symbol<T>(_ name: String, as: T.Type) -> T {
        guard let p = dlsym(UnsafeMutableRawPointer(bitPattern: 0), name) else { fatalError("libc has no \(name)") }
        return unsafeBitCast(p, to: T.self)
    }

    typealias Renameat2 = @convention(c) (Int32, UnsafePointer<CChar>, Int32, UnsafePointer<CChar>, UInt32) -> Int32
    typealias Fallocate = @convention(c) (Int32, Int32, Int64, Int64) -> Int32
    typealias SetXattr = @convention(c) (UnsafePointer<CChar>, UnsafePointer<CChar>, UnsafeRawPointer?, Int, Int32) -> Int32
    typealias GetXattr = @convention(c) (UnsafePointer<CChar>, UnsafePointer<CChar>, UnsafeMutableRawPointer?, Int) -> Int
    typealias ListXattr = @convention(c) (UnsafePointer<CChar>, UnsafeMutablePointer<CChar>?, Int) -> Int
    typealias RemoveXattr = @convention(c) (UnsafePointer<CChar>, UnsafePointer<CChar>) -> Int32

    /// 0 or the errno of renameat2(AT_FDCWD, from, AT_FDCWD, to, flags).
    static func rename(_ from: String, _ to: String, flags: UInt32) -> Int32 {
        symbol("renameat2", as: Renameat2.self)(AT_FDCWD, from, AT_FDCWD, to, flags) == 0 ? 0 : errno
    }

    static func fallocate(_ fd: Int32, mode: Int32, offset: Int64, length: Int64) -> Int32 {
        symbol("fallocate", as: Fallocate.self)(fd, mode, offset, length) == 0 ? 0 : errno
    }

    static func setxattr(_ path: String, _ name: String, _ value: [UInt8], flags: Int32 = 0) -> Int32 {
        value.withUnsafeBytes { symbol("setxattr", as: SetXattr.self)(path, name, $0.baseAddress, $0.count, flags) } == 0 ? 0 : errno
    }

    /// The value, or the errno; `size` 0 asks for the length only.
    static func getxattr(_ path: String, _ name: String, size: Int) -> Result<[UInt8], Errno> {
        var buffer = [UInt8](repeating: 0, count: size)
        let n = buffer.withUnsafeMutableBytes { symbol("getxattr", as: GetXattr.self)(path, name, size == 0 ? nil : $0.baseAddress, size) }
        guard n >= 0 else { return .failure(Errno(rawValue: errno)) }
        return .success(size == 0 ? [UInt8](repeating: 0, count: n) : Array(buffer[0..<n]))
    }

    static func listxattr(_ path: String) -> [String] {
        let f = symbol("listxattr", as: ListXattr.self)
        let n = f(path, nil, 0)
        guard n > 0 else { return [] }
        var buffer = [CChar](repeating: 0, count: n)
        let got = f(path, &buffer, n)
        return buffer[0..<max(got, 0)].split(separator: 0).map { String(decoding: $0.map { UInt8(bitPattern: $0) }, as: UTF8.self) }
    }

    static func removexattr(_ path: String, _ name: String) -> Int32 {
        symbol("removexattr", as: RemoveXattr.self)(path, name) == 0 ? 0 : errno
    }

    /// 0 or errno of a call returning -1 on failure.
    static func check(_ rc: Int32) -> Int32 { rc == 0 ? 0 : errno }
    static func check(_ rc: Int) -> Int32 { rc >= 0 ? 0 : errno }
}

/// A MemoryVolume mounted in-process: the session loop runs on its own thread.
final class TestMount: Sendable {
    let volume: MemoryVolume
    let server: FUSEServer
    let path: String
    private let finished = DispatchSemaphore(value: 0)
    private let loopError = Mutex<FUSEServer.Error?>(nil)

    init(volume: MemoryVolume = MemoryVolume(), readOnly: Bool = false, commitInterval: Duration? = nil,
         opensInKernel: Bool = true) throws {
        var template = Array((NSTemporaryDirectory() + "thinfs-fuse-XXXXXX").utf8CString)
        guard let dir = mkdtemp(&template) else { throw Errno(rawValue: errno) }
        path = String(cString: dir)
        self.volume = volume
        var logger = Logger(label: "thinfs.fuse.test")
        logger.logLevel = .warning
        server = FUSEServer(volume: volume, mountpoint: path,
                            // The mount option, so that its path through to INIT is tested too.
                            options: .init(readOnly: readOnly, source: "memory", extraOptions: opensInKernel ? [] : ["opens=daemon"],
                                           commitInterval: commitInterval),
                            logger: logger)
        do {
            try server.mount()
        } catch {
            rmdir(path)
            throw error
        }
        let thread = Thread { [self] in
            do throws(FUSEServer.Error) { try server.run() } catch { loopError.withLock { $0 = error } }
            finished.signal()
        }
        thread.name = "fuse-loop"
        thread.start()
    }

    func file(_ name: String) -> String { path + "/" + name }

    /// Waits for the session loop to return (after a stop or an unmount).
    func waitForExit(seconds: Double) -> Bool {
        guard finished.wait(timeout: .now() + seconds) == .success else { return false }
        finished.signal()  // tearDown waits too
        return true
    }

    /// Stops the server as a signal handler would, joins the loop, and removes the mount point.
    /// A second stop (aborting the connection) follows if the first does not end the loop.
    @discardableResult
    func tearDown() -> FUSEServer.Error? {
        server.stop()
        if finished.wait(timeout: .now() + 10) == .timedOut {
            server.stop()
            _ = finished.wait(timeout: .now() + 10)
        }
        if Host.isMounted(path) { umount2(path, Int32(MNT_DETACH)) }
        rmdir(path)
        return loopError.withLock { $0 }
    }

    /// Mounts, runs `body`, and always tears down, even when `body` throws.
    static func with<T>(_ volume: MemoryVolume = MemoryVolume(), readOnly: Bool = false, commitInterval: Duration? = nil,
                        opensInKernel: Bool = true, _ body: (TestMount) throws -> T) throws -> T {
        let m = try TestMount(volume: volume, readOnly: readOnly, commitInterval: commitInterval, opensInKernel: opensInKernel)
        defer {
            let error = m.tearDown()
            #expect(error == nil, "the session loop failed: \(String(describing: error))")
            #expect(!Host.isMounted(m.path), "\(m.path) is still mounted")
        }
        return try body(m)
    }
}

/// Small syscall wrappers for the tests: each returns 0 or errno.
enum Sys {
    static func attributes(_ path: String) -> (Int32, Glibc.stat) {
        var st = Glibc.stat()
        let rc = stat(path, &st)
        return (rc == 0 ? 0 : errno, st)
    }

    static func writeFile(_ path: String, _ bytes: [UInt8], flags: Int32 = O_WRONLY | O_CREAT | O_TRUNC) -> Int32 {
        let fd = open(path, flags, 0o644)
        guard fd >= 0 else { return errno }
        defer { close(fd) }
        let n = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        return n == bytes.count ? 0 : errno
    }

    static func readFile(_ path: String) -> [UInt8]? {
        FileManager.default.contents(atPath: path).map { [UInt8]($0) }
    }

    static func readdir(_ path: String) -> [String]? {
        guard let dir = opendir(path) else { return nil }
        defer { closedir(dir) }
        var names: [String] = []
        while let e = Glibc.readdir(dir) {
            names.append(withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) })
        }
        return names
    }
}

/// Polls `condition` for up to `seconds`.
func eventually(_ seconds: Double = 3, _ condition: () -> Bool) -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if condition() { return true }
        usleep(20_000)
    }
    return condition()
}
