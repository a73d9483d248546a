import Foundation
import TestSupport
import Testing
@testable import ThinFS
#if canImport(Glibc)
import Glibc
#endif

/// Requests the server declines so that the kernel stops sending them, and what must still hold.
@Suite("FUSE upcalls", .enabled(if: Host.canMountFUSE, "needs /dev/fuse and root"))
struct UpcallTests {
    /// FLUSH is answered ENOSYS, so after the first close the kernel sends none. close(2) must
    /// still deliver the file's cached pages to the volume before it returns, for every file,
    /// not only the first, and report nothing wrong.
    @Test func closeDeliversTheDataWithoutFlushRequests() throws {
        try TestMount.with { m in
            for i in 0..<20 {
                let name = "f\(i)"
                let bytes = (0..<(1000 * i + 1)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ i) }
                let fd = open(m.file(name), O_WRONLY | O_CREAT | O_EXCL, 0o644)
                #expect(fd >= 0)
                // Several writes, as tar makes them: the kernel's cache merges them.
                for chunk in stride(from: 0, to: bytes.count, by: 700) {
                    let end = min(chunk + 700, bytes.count)
                    let n = bytes[chunk..<end].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
                    #expect(n == end - chunk)
                }
                #expect(close(fd) == 0, "close of \(name): \(errno)")
                // Straight from the volume, not through the kernel's page cache.
                let ino = try #require(m.volume.inode(name))
                #expect(m.volume.contents(ino) == bytes, "\(name) reached the volume when close returned")
            }
            // The kernel sends RELEASE after close(2) has returned (fuse_release is asynchronous),
            // so the releases may still be on their way: wait for them, with a bound that only a
            // lost release exceeds.
            let deadline = Date().addingTimeInterval(20)
            while !m.volume.record.opens.values.allSatisfy({ $0 == 0 }) && Date() < deadline { usleep(20_000) }
            #expect(m.volume.record.opens.values.allSatisfy { $0 == 0 }, "every open was released: \(m.volume.record.opens)")
        }
    }
}
