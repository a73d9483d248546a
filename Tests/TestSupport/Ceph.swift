import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A Ceph cluster for the RBD tests (issue 16).
///
/// `THINFS_CEPH_CONF` names a running one (CI's step starts it with scripts/ceph/cluster.sh and
/// stops it, also on failure). Without it, the first test that asks starts a throw-away cluster
/// with the same script (ceph-mon and ceph-osd as processes, memstore, 127.0.0.1) and this
/// process stops it by PID at exit, removing its directory. When neither works (no Ceph
/// packages, or another cluster holds the fixed ports) the tests skip, and the reason is printed.
public enum Ceph {
    /// The RADOS pool the tests use.
    public static let pool = "rbd"

    private static let state: Result<String, Failure> = start()
    private static let ownedDirectory = Locked<String?>(nil)

    public struct Failure: Error, CustomStringConvertible { public var description: String }

    /// The cluster's ceph.conf path, or why there is none.
    public static var conf: Result<String, Failure> { state }

    /// Whether a cluster is up; prints why not (once) when it is not.
    public static var available: Bool {
        switch state {
        case .success: return true
        case .failure(let f):
            if reported.exchange() { print("Ceph RBD tests skipped: \(f)") }
            return false
        }
    }

    /// The conf path; for tests gated on `available`.
    public static var confPath: String { (try? state.get()) ?? "/nonexistent/ceph.conf" }

    /// A name no other test (or earlier run) uses: each test gets its own rbd.prefix.
    public static func uniquePrefix(_ what: String) -> String {
        "t\(getpid())-\(what)-\(UUID().uuidString.prefix(8).lowercased())-"
    }

    /// The `rbd` CLI against the test cluster. Commands that draw progress bars on stderr
    /// (export, rm) want `--no-progress`; the others refuse it.
    public static func rbd(_ args: [String]) throws -> Oracle.Result {
        try Oracle.run("/usr/bin/rbd", ["-c", confPath] + args)
    }

    /// The images of the test pool whose names start with `prefix`.
    public static func images(prefix: String) throws -> [String] {
        let r = try rbd(["ls", pool])
        guard r.status == 0 else { throw Failure(description: "rbd ls: \(r.stderr)") }
        return r.stdout.split(separator: "\n").map(String.init).filter { $0.hasPrefix(prefix) }.sorted()
    }

    static var packageRoot: URL {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    }

    private static func start() -> Result<String, Failure> {
        if ProcessInfo.processInfo.environment["THINFS_CEPH"] == "off" {
            return .failure(Failure(description: "THINFS_CEPH=off (scripts/test.sh runs them in its 'ceph rbd' step)"))
        }
        if let conf = ProcessInfo.processInfo.environment["THINFS_CEPH_CONF"], !conf.isEmpty {
            return FileManager.default.fileExists(atPath: conf) ? .success(conf) : .failure(Failure(description: "THINFS_CEPH_CONF=\(conf) does not exist"))
        }
        for tool in ["/usr/bin/ceph-mon", "/usr/bin/ceph-osd", "/usr/bin/rbd"] where !FileManager.default.isExecutableFile(atPath: tool) {
            return .failure(Failure(description: "\(tool) is not installed (apt-get install ceph-mon ceph-osd ceph-common)"))
        }
        guard FileManager.default.fileExists(atPath: "/usr/include/rbd/librbd.h") else {
            return .failure(Failure(description: "librbd-dev is not installed"))
        }
        let script = packageRoot.appendingPathComponent("scripts/ceph/cluster.sh").path
        let dir = NSTemporaryDirectory() + "thinfs-ceph-\(getpid())"
        do {
            let r = try Oracle.run("/bin/bash", [script, "start", dir, pool])
            guard r.status == 0 else {
                return .failure(Failure(description: "scripts/ceph/cluster.sh start failed (\(r.status)): \(r.stderr.suffix(2000))"))
            }
            ownedDirectory.withLock { $0 = dir }
            // Stopped by PID (the script reads DIR/*.pid) when the test process exits.
            atexit { Ceph.stopOwnedCluster() }
            return .success(r.stdout.trimmingCharacters(in: .whitespacesAndNewlines))
        } catch {
            return .failure(Failure(description: "running \(script): \(error)"))
        }
    }

    static func stopOwnedCluster() {
        guard let dir = ownedDirectory.withLock({ d -> String? in defer { d = nil }; return d }) else { return }
        let script = packageRoot.appendingPathComponent("scripts/ceph/cluster.sh").path
        _ = try? Oracle.run("/bin/bash", [script, "stop", dir])
    }

    private static let reported = Once()

    final class Once: @unchecked Sendable {
        private var done = false
        private let lock = NSLock()
        /// True the first time only.
        func exchange() -> Bool { lock.lock(); defer { lock.unlock() }; defer { done = true }; return !done }
    }

    final class Locked<T>: @unchecked Sendable {
        private var value: T
        private let lock = NSLock()
        init(_ value: T) { self.value = value }
        func withLock<R>(_ body: (inout T) -> R) -> R { lock.lock(); defer { lock.unlock() }; return body(&value) }
    }
}
