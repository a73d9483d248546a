import Foundation
import Testing
import ThinFS
#if canImport(Glibc)
import Glibc
#endif

/// `ServiceSocket.removeStale`, which both of serve's front doors (containerd, Docker) call before
/// they bind: a dead server's socket goes, anything else stays and is refused.
@Suite struct ServiceSocketTests {
    func tempDir() throws -> String {
        var template = Array((NSTemporaryDirectory() + "/thinfs-socket-XXXXXX").utf8CString)
        guard let made = mkdtemp(&template) else { throw POSIXError(.EIO) }
        return String(cString: made)
    }

    @Test func aRegularFileIsLeftAloneAndRefused() throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/plugin.sock"
        try Data("not a socket".utf8).write(to: URL(fileURLWithPath: path))
        #expect(!ServiceSocket.removeStale(at: path))
        #expect(FileManager.default.contents(atPath: path) == Data("not a socket".utf8))
    }

    @Test func aStaleSocketIsRemovedAndAMissingPathIsFree() throws {
        let dir = try tempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/plugin.sock"
        #expect(ServiceSocket.removeStale(at: path))
        // A socket bound and closed, as a killed server leaves it.
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        try #require(fd >= 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in path.utf8.enumerated() { raw[i] = b }
        }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        close(fd)
        try #require(rc == 0)
        #expect(FileManager.default.fileExists(atPath: path))
        #expect(ServiceSocket.removeStale(at: path))
        #expect(!FileManager.default.fileExists(atPath: path))
    }
}
