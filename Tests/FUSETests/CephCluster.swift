import Foundation
import TestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// A Ceph cluster of a test's own: scripts/ceph/cluster.sh on `address` (another loopback
/// address than the 127.0.0.1 of the CI step's cluster, which the other RBD suites use at the
/// same time, or a veth's), in a directory of its own. `stop` stops its daemons by PID and
/// removes it; callers defer it right after making one.
final class CephCluster: @unchecked Sendable {
    let dir: String
    let address: String
    private(set) var conf = ""
    static let script = LayerFixture.packageRoot.appendingPathComponent("scripts/ceph/cluster.sh").path

    init(dir: String, address: String) {
        self.dir = dir
        self.address = address
    }

    private func run(_ command: String) throws -> Oracle.Result {
        try Oracle.run("/usr/bin/env", ["THINFS_CEPH_ADDR=\(address)", "bash", Self.script, command, dir])
    }

    func start() throws {
        let r = try run("start")
        guard r.status == 0 else { throw LayerFixture.Failure("cluster.sh start \(dir) on \(address): \(r.stderr)") }
        conf = r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// Both daemons stopped by PID (SIGTERM); their data kept.
    func halt() throws {
        let r = try run("halt")
        guard r.status == 0 else { throw LayerFixture.Failure("cluster.sh halt \(dir): \(r.stderr)") }
    }

    /// The halted daemons started again on the same data; returns once the pool is writable.
    func resume() throws {
        let r = try run("resume")
        guard r.status == 0 else { throw LayerFixture.Failure("cluster.sh resume \(dir): \(r.stderr)") }
    }

    func stop() { _ = try? run("stop") }

    /// The `rbd` CLI against this cluster.
    func rbd(_ args: [String]) throws -> Oracle.Result { try Oracle.run("/usr/bin/rbd", ["-c", conf] + args) }

    /// The `rados` CLI against this cluster's pool `rbd`.
    func rados(_ args: [String]) throws -> Oracle.Result { try Oracle.run("/usr/bin/rados", ["-c", conf, "-p", "rbd"] + args) }

    /// The images of pool `rbd` whose names start with `prefix`.
    func images(prefix: String) throws -> [String] {
        let r = try rbd(["ls", "rbd"])
        guard r.status == 0 else { throw LayerFixture.Failure("rbd ls: \(r.stderr)") }
        return r.stdout.split(separator: "\n").map(String.init).filter { $0.hasPrefix(prefix) }.sorted()
    }
}

/// A second host's network for the two-host tests (issue 16): a network namespace joined to
/// this one by a veth pair, with addresses of our own (10.213.16.0/30: the host end .1, where
/// the test's cluster listens; the namespace's end .2). Host B's commands run in it through
/// nsenter(1), which enters the network namespace only: B's FUSE mounts stay in the test's
/// mount namespace (`ip netns exec` would make a mount namespace of its own).
/// `remove` deletes both, also after a failure: deleting the namespace deletes its end of the
/// pair, and the pair with it.
final class NetworkNamespace: @unchecked Sendable {
    static let hostAddress = "10.213.16.1"
    static let peerAddress = "10.213.16.2"
    let name: String
    let hostLink: String
    var path: String { "/run/netns/\(name)" }

    static var available: Bool { FileManager.default.isExecutableFile(atPath: "/usr/sbin/ip") && FileManager.default.isExecutableFile(atPath: "/usr/bin/nsenter") }

    init() throws {
        let tag = String(getpid() % 100_000)
        name = "thinfs-ceph-\(tag)"
        hostLink = "tfs\(tag)h"   // an interface name has at most 15 characters
        let peer = "tfs\(tag)n"
        let steps = [
            ["netns", "add", name],
            ["link", "add", hostLink, "type", "veth", "peer", "name", peer, "netns", name],
            ["addr", "add", "\(Self.hostAddress)/30", "dev", hostLink],
            ["link", "set", hostLink, "up"],
            ["-n", name, "addr", "add", "\(Self.peerAddress)/30", "dev", peer],
            ["-n", name, "link", "set", peer, "up"],
            ["-n", name, "link", "set", "lo", "up"],
        ]
        for step in steps {
            let r = try Oracle.run("/usr/sbin/ip", step)
            guard r.status == 0 else {
                remove()
                throw LayerFixture.Failure("ip \(step.joined(separator: " ")): \(r.stderr)")
            }
        }
    }

    func remove() {
        _ = try? Oracle.run("/usr/sbin/ip", ["netns", "del", name])
        _ = try? Oracle.run("/usr/sbin/ip", ["link", "del", hostLink])
    }

    /// The network namespace `pid` runs in, as /proc names it ("net:[inode]").
    static func of(_ pid: pid_t) -> String? { try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/ns/net") }

    /// This namespace, named the same way.
    var identity: String? {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        return "net:[\(st.st_ino)]"
    }
}
