import Foundation
import SystemPackage
import TestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// ROOT/control.sock of a running daemon, spoken to with raw bytes: what no `LayerRequest`
/// encodes (NUL bytes, wrong types, oversize lines, nothing at all) must get an answer naming
/// what is wrong, change no other layer, and neither pin the daemon nor grow its memory.
@Suite("Control socket", .serialized,
       .enabled(if: Host.canMountFUSE && Binaries.available && Oracle.available,
                "needs /dev/fuse, root, the built binaries and thin-provisioning-tools"))
struct ControlSocketTests {
    /// A store with image layers `x..y` and `img`, `img` mounted: its daemon owns the socket.
    func started() throws -> (LayerFixture, mountpoint: String) {
        let f = try LayerFixture(deferredDeletion: false)
        try f.ok(["layer", "create", "x..y"])
        try f.ok(["layer", "create", "img"])
        let mnt = f.mountpoint("img")
        try f.ok(["mount", "img", mnt])
        return (f, mnt)
    }

    @Test func nulBytesAndWrongTypesNameTheFieldAndTouchNoOtherLayer() throws {
        let (f, mnt) = try started()
        defer { f.tearDown() }
        let before = try f.listing("x..y")
        let content = f.dir.path + "/content"
        try FileManager.default.createDirectory(atPath: content, withIntermediateDirectories: true)
        #expect(Sys.writeFile(content + "/planted", Array("planted\n".utf8)) == 0)
        let tar = f.dir.path + "/planted.tar"
        #expect(try LayerFixture.shell("tar -cf \(tar) -C \(content) planted").status == 0)
        let out = f.dir.path + "/out.tar"
        let other = f.mountpoint("other")
        let socket = f.root + "/control.sock"

        // Each case: the request line as sent (JSON escapes as written: \u0000 is a NUL in the
        // decoded string), and what the error must name. SQLite, open(2) and mount(2) stop at a
        // NUL, so the part before it names another layer, file or directory.
        let cases: [(String, String)] = [
            (#"{"operation":"apply-diff","layer":"x..y\u0000junk","path":"\#(tar)"}"#, #""x..y\0junk""#),
            (#"{"operation":"diff","layer":"x..y\u0000junk","path":"\#(out)"}"#, #""x..y\0junk""#),
            (#"{"operation":"mount","layer":"x..y\u0000junk","mountpoint":"\#(other)"}"#, #""x..y\0junk""#),
            (#"{"operation":"create","layer":"z","parent":"x..y\u0000junk"}"#, #""x..y\0junk""#),
            (#"{"operation":"create","layer":"z\u0000junk"}"#, #""z\0junk""#),
            // Last: before, it removed x..y.
            (#"{"operation":"rm","layer":"x..y\u0000junk"}"#, #""x..y\0junk""#),
            // A NUL in a path: the mount point, the diff's output file.
            (#"{"operation":"mount","layer":"x..y","mountpoint":"\#(other)\u0000junk"}"#, #"mount point "\#(other)\0junk""#),
            (#"{"operation":"diff","layer":"x..y","path":"\#(out)\u0000junk"}"#, #""\#(out)\0junk""#),
            (#"{"operation":"mount","layer":"x..y","mountpoint":"\#(other)","mountOptions":["ro\u0000,rw"]}"#, #""ro\0,rw""#),
            // Valid JSON, wrong types: the answer names the field.
            (#"{"operation":"create","layer":"a","size":-1}"#, "size"),
            (#"{"operation":"create","layer":"a","size":1.5}"#, "size"),
            (#"{"operation":"rm","layer":5}"#, "layer"),
            (#"{"operation":"mount","layer":"x..y","mountpoint":"\#(other)","mountOptions":["ro",7]}"#, "mountOptions[1]"),
        ]
        for (line, fragment) in cases {
            let client = try RawClient(socket)
            client.send(Array((line + "\n").utf8))
            guard let answer = client.answer(seconds: 30) else {
                Issue.record("no answer to \(line)")
                continue
            }
            guard let error = answer.error else {
                Issue.record("\(line) succeeded: \(answer.output)")
                continue
            }
            #expect(error.contains(fragment), "\(line): \(error)")
            #expect(!error.contains("not valid JSON"), "\(line): \(error)")
        }
        let after = try f.listing("x..y")
        #expect(NSDictionary(dictionary: after).isEqual(to: before), "layer x..y changed: \(after) was \(before)")
        #expect(try f.run(["layer", "ls"]).stdout.split(separator: "\n").allSatisfy { !$0.hasPrefix("z ") && !$0.hasPrefix("a ") })
        #expect(!FileManager.default.fileExists(atPath: out), "the diff of x..y was written")
        #expect(!Host.isMounted(other), "x..y was mounted at \(other)")

        try f.ok(["umount", mnt])
        try f.waitForDaemons()
        try f.expectNoLeaks()
    }

    /// Layer ids that try to leave the store (`../`, absolute, a slash, `..`) are refused by
    /// every operation that takes one, naming the id, before any file is touched: the root's
    /// tree, its parent's and /tmp are as they were, and no layer is made or removed.
    @Test func namesThatTryToLeaveTheRootAreRefusedBeforeAnyFileIsTouched() throws {
        let (f, mnt) = try started()
        defer { f.tearDown() }
        let tar = f.dir.path + "/empty.tar"
        #expect(try LayerFixture.shell("tar -cf \(tar) -T /dev/null").status == 0)
        let out = f.dir.path + "/out.tar"
        let other = f.mountpoint("other")
        func tree(_ path: String) -> [String] {
            // SQLite's journal comes and goes with every transaction.
            ((FileManager.default.enumerator(atPath: path)?.allObjects as? [String]) ?? []).filter { !$0.contains("layers.db-") }.sorted()
        }
        // First: layer ls makes each layer's lock file.
        let layers = try f.run(["layer", "ls"]).stdout
        let before = (root: tree(f.root), dir: tree(f.dir.path))
        #expect(!FileManager.default.fileExists(atPath: "/tmp/evil"))

        for id in ["../evil", "/tmp/evil", "a/b", "..", "../../../../tmp/evil", "./x"] {
            let requests = [
                #"{"operation":"create","layer":"\#(id)"}"#,
                #"{"operation":"create-rw","layer":"\#(id)","parent":"img"}"#,
                #"{"operation":"create-rw","layer":"z","parent":"\#(id)"}"#,
                #"{"operation":"rm","layer":"\#(id)"}"#,
                #"{"operation":"mount","layer":"\#(id)","mountpoint":"\#(other)"}"#,
                #"{"operation":"diff","layer":"\#(id)","path":"\#(out)"}"#,
                #"{"operation":"apply-diff","layer":"\#(id)","path":"\#(tar)"}"#,
            ]
            for line in requests {
                let client = try RawClient(f.root + "/control.sock")
                client.send(Array((line + "\n").utf8))
                guard let answer = client.answer(seconds: 30) else {
                    Issue.record("no answer to \(line)")
                    continue
                }
                #expect(answer.error?.contains(id) == true, "\(line): \(answer)")
            }
        }
        #expect(tree(f.root) == before.root, "the root changed")
        #expect(tree(f.dir.path) == before.dir, "the root's parent changed")
        #expect(!FileManager.default.fileExists(atPath: "/tmp/evil"))
        #expect(!FileManager.default.fileExists(atPath: out), "a diff was written")
        #expect(!Host.isMounted(other))
        #expect(try f.run(["layer", "ls"]).stdout == layers)

        try f.ok(["umount", mnt])
        try f.waitForDaemons()
        try f.expectNoLeaks()
    }

    /// A connection that never sends its request (a hung or stopped client) must not keep the
    /// daemon, and the pool's lock, past the last unmount.
    @Test func idleConnectionsDoNotKeepTheDaemonAlive() throws {
        let (f, mnt) = try started()
        defer { f.tearDown() }
        let socket = f.root + "/control.sock"
        let silent = try RawClient(socket)
        let partial = try RawClient(socket)
        partial.send(Array(#"{"operation":"ls""#.utf8))   // half a request, no newline
        // A request round trip: both connections have been accepted by now.
        #expect(try f.run(["layer", "ls"]).status == 0)

        try f.ok(["umount", mnt])
        // Bounded, so a daemon that waits for them fails the test instead of hanging it.
        try f.waitForDaemons()
        let ls = try f.run(["layer", "ls"])
        #expect(ls.status == 0, "\(ls.stderr)")
        // Both were told the daemon stopped (EAGAIN: a client retries), then closed.
        for client in [silent, partial] {
            let answer = try #require(client.answer(seconds: 5), "the idle connection was neither answered nor closed")
            #expect(answer.errno == EAGAIN, "\(answer)")
        }
        try f.expectNoLeaks()
    }

    /// Request lines are bounded (1 MiB): four 64 MiB lines at once get an error each, and the
    /// daemon's peak memory grows by far less than what they sent.
    @Test func oversizeRequestsAreRefusedInBoundedMemory() throws {
        let (f, mnt) = try started()
        defer { f.tearDown() }
        let daemon = try #require(f.daemons().first)
        let peakBefore = try #require(Self.peakMemory(daemon))
        let socket = f.root + "/control.sock"
        let chunk = [UInt8](repeating: UInt8(ascii: "x"), count: 1 << 20)
        let answers = Locked<[String]>([])
        DispatchQueue.concurrentPerform(iterations: 4) { _ in
            guard let client = try? RawClient(socket) else { return answers.withLock { $0.append("connect failed") } }
            client.send(Array(#"{"operation":"rm","layer":""#.utf8))
            for _ in 0..<64 where client.send(chunk) == 0 {}
            client.shutdownWrite()
            let error = client.answer(seconds: 60)?.error ?? "no answer"
            answers.withLock { $0.append(error) }
        }
        let errors = answers.withLock { $0 }
        #expect(errors.count == 4)
        for error in errors { #expect(error.contains("longer than 1 MiB"), "\(error)") }
        let peakAfter = try #require(Self.peakMemory(daemon))
        #expect(peakAfter - peakBefore < 32 << 20, "the daemon's peak memory grew by \(ByteCount(peakAfter - peakBefore)) for 256 MiB of refused requests")
        // It still serves.
        #expect(try f.run(["layer", "ls"]).status == 0)
        try f.ok(["umount", mnt])
        try f.waitForDaemons()
        try f.expectNoLeaks()
    }

    /// At most 64 connections at once: the next is refused with an error at once, not left
    /// waiting for a thread. A connection silent for 30 s is answered and closed, which frees
    /// its place.
    @Test func connectionsAreBoundedAndIdleOnesTimeOut() throws {
        let (f, mnt) = try started()
        defer { f.tearDown() }
        let socket = f.root + "/control.sock"
        let opened = Date()
        let idle = try (0..<64).map { _ in try RawClient(socket) }
        let extra = try RawClient(socket)
        extra.send(Array(#"{"operation":"ls"}"#.utf8 + [10]))
        let refused = try #require(extra.answer(seconds: 10), "the 65th connection got no answer")
        #expect(refused.error?.contains("too many connections") == true, "\(refused)")

        let first = try #require(idle[0].answer(seconds: 60), "an idle connection was not answered within 60 s")
        let waited = Date().timeIntervalSince(opened)
        #expect(first.error?.contains("no request within 30 s") == true, "\(first)")
        #expect(waited >= 29 && waited < 45, "answered after \(waited) s")
        for client in idle.dropFirst() { #expect(client.answer(seconds: 15) != nil) }
        // Their places are free again.
        let after = try RawClient(socket)
        after.send(Array(#"{"operation":"ls"}"#.utf8 + [10]))
        let listed = try #require(after.answer(seconds: 10))
        #expect(listed.error == nil && listed.output.contains("img"), "\(listed)")

        try f.ok(["umount", mnt])
        try f.waitForDaemons()
        try f.expectNoLeaks()
    }

    /// VmHWM of `pid`, in bytes: the peak resident set size.
    static func peakMemory(_ pid: pid_t) -> Int? {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
              let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmHWM:") }),
              let kB = Int(line.split(separator: " ")[1]) else { return nil }
        return kB * 1024
    }
}

struct ByteCount: CustomStringConvertible {
    var bytes: Int
    init(_ bytes: Int) { self.bytes = bytes }
    var description: String { "\(bytes >> 20) MiB" }
}

/// A client of ROOT/control.sock speaking raw bytes over socket(2), not `ControlSocket.send`,
/// so a test can send what no `LayerRequest` encodes.
final class RawClient: @unchecked Sendable {
    struct Answer: CustomStringConvertible {
        var output: String
        var error: String?
        var errno: Int32?
        var description: String { "output \(output.debugDescription), error \(error.debugDescription), errno \(errno.map(String.init) ?? "-")" }
    }

    let fd: Int32

    init(_ path: String) throws {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw Errno(rawValue: errno) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in path.utf8.enumerated() { raw[i] = b }
        }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else {
            let e = errno
            close(fd)
            throw Errno(rawValue: e)
        }
    }

    deinit { close(fd) }

    /// Sends `bytes`: 0, or the errno that stopped it (EPIPE once the daemon has closed).
    @discardableResult
    func send(_ bytes: [UInt8]) -> Int32 {
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + done, $0.count - done, Int32(MSG_NOSIGNAL)) }
            if n < 0 {
                if errno == EINTR { continue }
                return errno
            }
            done += n
        }
        return 0
    }

    func shutdownWrite() { shutdown(fd, Int32(SHUT_WR)) }

    /// Everything received until the daemon closes the connection; nil if it has not closed
    /// within `seconds`.
    func readToEnd(seconds: Double) -> Data? {
        let deadline = Date().addingTimeInterval(seconds)
        var data = Data()
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let left = deadline.timeIntervalSinceNow
            guard left > 0 else { return nil }
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&p, 1, Int32(left * 1000) + 1)
            if ready < 0 && errno == EINTR { continue }
            guard ready > 0 else { continue }
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n < 0 {
                if errno == EINTR { continue }
                return data   // reset after its answer
            }
            if n == 0 { return data }
            data.append(contentsOf: chunk[0..<n])
        }
    }

    /// The daemon's one-line JSON answer, read with JSONSerialization (not our decoder); nil if
    /// the connection was not closed within `seconds` or the answer is not a JSON object.
    func answer(seconds: Double) -> Answer? {
        guard let data = readToEnd(seconds: seconds), !data.isEmpty,
              let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else { return nil }
        return Answer(output: object["output"] as? String ?? "", error: object["error"] as? String,
                      errno: (object["errno"] as? NSNumber)?.int32Value)
    }
}
