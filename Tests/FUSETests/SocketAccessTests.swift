import Foundation
import TestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Issue 14, §5: `thinfs serve`'s sockets (the control socket, containerd's snapshots API,
/// Docker's plugin protocol) let root in and nobody else: another uid's connect(2) is refused
/// with EACCES. Serve starts under umask 000 here, so the sockets' modes must come from serve
/// itself, not from whoever started it (a unit file or a shell with a loose umask).
@Suite("Who may reach serve's sockets",
       .enabled(if: Host.canMountFUSE && Binaries.available && Oracle.available && SocketProbe.available,
                "needs root, /dev/fuse, the built binaries, thin_check, setpriv and python3"),
       .serialized)
struct SocketAccessTests {
    @Test func anotherUserIsRefusedAtEverySocket() throws {
        let f = try LayerFixture(deferredDeletion: false)
        defer { f.tearDown() }
        let tag = UUID().uuidString.prefix(8).lowercased()
        let containerd = "/tmp/thinfs-ctrd-\(tag).sock"
        let plugin = "thinfs-access-\(tag)"
        let pluginSocket = "/run/docker/plugins/\(plugin).sock"
        let serve = try ServeProcess(root: f.root, arguments: ["--containerd-socket", containerd, "--docker-plugin", plugin], umask: 0)
        defer {
            serve.tearDown()
            unlink(containerd)
            unlink(pluginSocket)
        }
        try serve.waitReady()

        // The control: a socket of our own, open to all, in the same directories; the other uid
        // connects to it, so a refusal below is the socket's mode, not the path.
        let open = try SocketProbe.Listener(paths: [f.root + "/open.sock", "/tmp/thinfs-open-\(tag).sock", "/run/docker/plugins/thinfs-open-\(tag).sock"])
        defer { open.close() }
        for path in open.paths {
            #expect(try SocketProbe.connect(path, asUID: SocketProbe.otherUID) == "connected", "uid \(SocketProbe.otherUID) cannot reach \(path) at all")
        }

        for path in [LayerFixture.controlSocket(f.root), containerd, pluginSocket] {
            #expect(try SocketProbe.connect(path, asUID: 0) == "connected", "root cannot connect to \(path)")
            var st = stat()
            #expect(lstat(path, &st) == 0 && st.st_mode & 0o077 == 0, "\(path) has mode \(String(st.st_mode & 0o7777, radix: 8))")
            let answer = try SocketProbe.connect(path, asUID: SocketProbe.otherUID)
            #expect(answer == "EACCES", "uid \(SocketProbe.otherUID) connecting to \(path): \(answer)")
        }
        #expect(try serve.stop(SIGTERM) == .exited(0), "\(serve.log)")
        try f.expectNoLeaks()
    }
}

/// connect(2) to a unix socket as another user, through setpriv and python3 (a fresh process:
/// the test runner keeps its uid).
enum SocketProbe {
    static let otherUID: uid_t = 4242
    static let setpriv = "/usr/bin/setpriv", python = "/usr/bin/python3"
    static var available: Bool { [setpriv, python].allSatisfy { FileManager.default.isExecutableFile(atPath: $0) } }

    /// "connected", or the errno's name (EACCES, ECONNREFUSED...).
    static func connect(_ path: String, asUID uid: uid_t) throws -> String {
        let script = """
        import errno, socket, sys
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(sys.argv[1])
            print("connected")
        except OSError as e:
            print(errno.errorcode.get(e.errno, str(e.errno)))
        """
        let r = try Oracle.run(setpriv, ["--reuid=\(uid)", "--regid=\(uid)", "--clear-groups", python, "-c", script, path])
        return r.stdout.trimmingCharacters(in: .whitespacesAndNewlines) + r.stderr
    }

    /// Listening sockets anyone may connect to (0777 under any umask: chmod after bind).
    final class Listener {
        let paths: [String]
        private var fds: [Int32] = []
        init(paths: [String]) throws {
            self.paths = paths
            for path in paths {
                unlink(path)
                let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
                guard fd >= 0 else { throw LayerFixture.Failure("socket: errno \(errno)") }
                fds.append(fd)
                var addr = sockaddr_un()
                addr.sun_family = sa_family_t(AF_UNIX)
                withUnsafeMutableBytes(of: &addr.sun_path) { raw in
                    for (i, b) in path.utf8.enumerated() where i < raw.count - 1 { raw[i] = b }
                }
                let rc = withUnsafePointer(to: &addr) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
                }
                guard rc == 0, listen(fd, 8) == 0, chmod(path, 0o777) == 0 else { throw LayerFixture.Failure("\(path): errno \(errno)") }
            }
        }
        func close() {
            for fd in fds { Glibc.close(fd) }
            for path in paths { unlink(path) }
        }
    }
}
