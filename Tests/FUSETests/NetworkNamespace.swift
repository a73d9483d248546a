import Foundation
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

/// A network namespace of a test's own, joined to the host's by a veth pair with addresses of
/// our own (10.231.N.1 on the host's side, 10.231.N.2 inside, a /30): a second "host" on one
/// machine. Commands run inside it through `nsenter --net=/run/netns/NAME` (`enter`), never
/// `ip netns exec`, which also unshares the mount namespace and remounts /sys for the command
/// (it broke a FUSE daemon started that way in session 8): a daemon started inside shares the
/// host's mounts, so its FUSE mount is seen by everyone. `remove` kills by PID what still runs
/// inside and deletes the pair and the namespace; callers defer it right after making one.
final class NetworkNamespace: @unchecked Sendable {
    let name: String
    let hostVeth: String, innerVeth: String
    let hostAddress: String, innerAddress: String
    var path: String { "/run/netns/\(name)" }
    /// The argv prefix that runs a program inside (give it an absolute path).
    var enter: [String] { ["/usr/bin/nsenter", "--net=\(path)", "--"] }

    static var toolsAvailable: Bool {
        ["/usr/sbin/ip", "/usr/bin/nsenter"].allSatisfy { FileManager.default.isExecutableFile(atPath: $0) }
    }

    struct Failure: Error, CustomStringConvertible { var description: String }

    private static func ip(_ args: [String]) throws -> Oracle.Result { try Oracle.run("/usr/sbin/ip", args) }

    /// Makes the namespace and the pair; throws, having removed what it made, if a step fails.
    init() throws {
        let pid = getpid()
        name = "thinfs-hostb-\(pid)"
        // Interface names are at most 15 bytes.
        hostVeth = "thb\(pid)a"
        innerVeth = "thb\(pid)b"
        // A /30 no interface of this machine has yet (another run of the suite may hold one).
        var subnet = Int(pid % 200) + 20
        for _ in 0..<200 {
            if let used = try? Self.ip(["-o", "addr", "show", "to", "10.231.\(subnet).0/30"]), used.stdout.isEmpty { break }
            subnet = subnet % 250 + 1
        }
        hostAddress = "10.231.\(subnet).1"
        innerAddress = "10.231.\(subnet).2"
        do {
            try step(["netns", "add", name])
            try step(["link", "add", hostVeth, "type", "veth", "peer", "name", innerVeth, "netns", name])
            try step(["addr", "add", "\(hostAddress)/30", "dev", hostVeth])
            try step(["link", "set", hostVeth, "up"])
            try inside(["addr", "add", "\(innerAddress)/30", "dev", innerVeth])
            try inside(["link", "set", innerVeth, "up"])
            try inside(["link", "set", "lo", "up"])
        } catch {
            remove()
            throw error
        }
    }

    private func step(_ args: [String]) throws {
        let r = try Self.ip(args)
        guard r.status == 0 else { throw Failure(description: "ip \(args.joined(separator: " ")): \(r.stderr)") }
    }

    private func inside(_ args: [String]) throws {
        let r = try run(["/usr/sbin/ip"] + args)
        guard r.status == 0 else { throw Failure(description: "ip \(args.joined(separator: " ")) in \(name): \(r.stderr)") }
    }

    /// `argv` (an absolute program and its arguments) run inside the namespace.
    func run(_ argv: [String]) throws -> Oracle.Result {
        try Oracle.run(enter[0], Array(enter.dropFirst()) + argv)
    }

    /// The namespace's inode, as /proc/PID/ns/net names it (`net:[INODE]`).
    var inode: UInt64? {
        var st = stat()
        return stat(path, &st) == 0 ? UInt64(st.st_ino) : nil
    }

    /// Whether process `pid` runs inside the namespace.
    func contains(_ pid: pid_t) -> Bool {
        guard let inode, let link = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/ns/net") else { return false }
        return link == "net:[\(inode)]"
    }

    /// The pids of the processes inside the namespace.
    func pids() -> [pid_t] {
        let procs = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        return procs.compactMap { pid_t($0) }.filter { contains($0) }
    }

    func remove() {
        // What a failed test left running inside keeps the namespace alive: killed by PID.
        for pid in pids() { kill(pid, SIGKILL) }
        _ = try? Self.ip(["link", "del", hostVeth])
        _ = try? Self.ip(["netns", "del", name])
    }
}
