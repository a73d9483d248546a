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
