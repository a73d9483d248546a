import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A Ceph cluster for the RBD tests (issue 16).
///
/// `THINFS_CEPH_CONF` names a running one: scripts/test.sh's "ceph rbd" step starts a throw-away
/// cluster with scripts/ceph/cluster.sh (ceph-mon and ceph-osd as processes, memstore,
/// 127.0.0.1) and stops it by PID on any exit. Without one (or without the Ceph packages) the
/// tests skip, and the reason is printed.
public enum Ceph {
    /// The RADOS pool the tests use.
    public static let pool = "rbd"

    private static let state: Result<String, Failure> = start()

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

    /// The cluster comes from outside the test process: starting one from a test's gate hung
    /// (the suite's planning waits on the script's output), and the shell can stop it by PID on
    /// any exit, which an atexit handler in a crashed test process cannot.
    private static func start() -> Result<String, Failure> {
        if ProcessInfo.processInfo.environment["THINFS_CEPH"] == "off" {
            return .failure(Failure(description: "THINFS_CEPH=off (scripts/test.sh runs them in its 'ceph rbd' step)"))
        }
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/rbd") else {
            return .failure(Failure(description: "/usr/bin/rbd is not installed (apt-get install ceph-mon ceph-osd ceph-common)"))
        }
        guard let conf = ProcessInfo.processInfo.environment["THINFS_CEPH_CONF"], !conf.isEmpty else {
            return .failure(Failure(description: "no test cluster: set THINFS_CEPH_CONF to the ceph.conf that 'scripts/ceph/cluster.sh start DIR' prints (scripts/test.sh's 'ceph rbd' step does this)"))
        }
        guard FileManager.default.fileExists(atPath: conf) else {
            return .failure(Failure(description: "THINFS_CEPH_CONF=\(conf) does not exist"))
        }
        return .success(conf)
    }

    private static let reported = Once()

    final class Once: @unchecked Sendable {
        private var done = false
        private let lock = NSLock()
        /// True the first time only.
        func exchange() -> Bool { lock.lock(); defer { lock.unlock() }; defer { done = true }; return !done }
    }
}
