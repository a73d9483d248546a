import Foundation
import TestSupport
import Testing

/// librados and librbd are loaded only by a store with thinfs.backend=rbd (CRBD dlopens them):
/// linked, they were a dozen of thinfs's shared libraries and much of every command's start-up.
@Suite("Ceph libraries loaded on demand", .enabled(if: CLI.available, "needs the thinfs binary"))
struct CephLibraryLoadingTests {
    /// Where the dynamic loader finds a soname, from `ldconfig -p`; nil if it is not installed.
    static func installedPath(_ soname: String) throws -> String? {
        let r = try Oracle.run("/usr/sbin/ldconfig", ["-p"])
        for line in r.stdout.split(separator: "\n") where line.trimmingCharacters(in: .whitespaces).hasPrefix(soname + " ") {
            if let arrow = line.range(of: "=> ") { return String(line[arrow.upperBound...]) }
        }
        return nil
    }

    /// ldd (the dynamic loader itself) lists what a start of thinfs loads.
    @Test func thinfsDoesNotLinkCeph() throws {
        let r = try Oracle.run("/usr/bin/ldd", [CLI.binary])
        try #require(r.status == 0, "ldd \(CLI.binary): \(r.stderr)")
        #expect(!r.stdout.contains("librados"), "thinfs links librados:\n\(r.stdout)")
        #expect(!r.stdout.contains("librbd"), "thinfs links librbd:\n\(r.stdout)")
    }

    /// With librados.so.2 unloadable (/dev/null bind-mounted over it in a private mount
    /// namespace), a local store still works and an RBD store fails with a message naming the
    /// library and the store option, and a plain exit, not a crash.
    @Test(.enabled(if: Host.isRoot && FileManager.default.isExecutableFile(atPath: "/usr/bin/unshare"), "needs root and unshare(1)"))
    func missingLibraryIsATypedErrorNamingIt() throws {
        guard let rados = try Self.installedPath("librados.so.2") else {
            Issue.record("librados.so.2 is not installed (ldconfig -p); scripts/setup.sh installs librados-dev")
            return
        }
        let dir = TempDir()
        let small = ["--storage-opt", "dm.basesize=64M", "--storage-opt", "dm.loopdatasize=512M", "--storage-opt", "dm.loopmetadatasize=16M"]
        // Runs thinfs ARGS with librados hidden; the namespace (and its mount) dies with the process.
        func withoutRados(_ args: [String]) throws -> Oracle.Result {
            try Oracle.run("/usr/bin/unshare", ["--mount", "--propagation", "private", "--", "/bin/sh", "-c",
                                                "mount --bind /dev/null \"$0\" && exec \"$@\"", rados, CLI.binary] + args)
        }
        let local = try withoutRados(["init", "--root", dir.path + "/local"] + small)
        #expect(local.status == 0, "a local store needs no Ceph library: \(local.stderr)")

        let rbd = try withoutRados(["init", "--root", dir.path + "/rbd", "--storage-opt", "thinfs.backend=rbd",
                                    "--storage-opt", "rbd.conf=\(dir.path)/no-such-ceph.conf"])
        #expect(rbd.status == 1, "exit \(rbd.status): \(rbd.stderr)")
        #expect(rbd.stderr.contains("librados.so.2"), "\(rbd.stderr)")
        #expect(rbd.stderr.contains("thinfs.backend=rbd"), "\(rbd.stderr)")
    }
}
