import Foundation
import TestSupport
import Testing

/// `thinfs layer create-rw ID --parent P --mount DIR`: a container's start in one process, with
/// no daemon (it starts one) and with one running (through its socket); a mount that fails
/// leaves no layer behind.
@Suite("layer create-rw --mount", .serialized,
       .enabled(if: Host.canMountFUSE && Binaries.available && Oracle.available,
                "needs /dev/fuse, root, the built binaries and thin-provisioning-tools"))
struct CreateRWMountTests {
    @Test func createsAndMountsInOneCommand() throws {
        let f = try LayerFixture(deferredDeletion: false)
        defer { f.tearDown() }
        try f.ok(["layer", "create", "img"])

        // No daemon yet: the command starts one, which serves the mount.
        let m1 = f.mountpoint("c1")
        try f.ok(["layer", "create-rw", "c1", "--parent", "img", "--mount", m1])
        #expect(Host.isMounted(m1))
        #expect(try f.layerState("c1") == "mounted")
        #expect(FileManager.default.createFile(atPath: m1 + "/hello", contents: Data("one".utf8)))

        // The daemon runs: the second goes through its control socket.
        let m2 = f.mountpoint("c2")
        try f.ok(["layer", "create-rw", "c2", "--parent", "img", "--mount", m2, "-o", "noatime"])
        #expect(Host.isMounted(m2))
        #expect(f.daemons().count == 1)
        // Each is its own snapshot of img.
        #expect(!FileManager.default.fileExists(atPath: m2 + "/hello"))

        // A mount point that is not there: an error naming it, and no layer c3 left.
        let missing = f.dir.path + "/no-such-dir"
        let r = try f.run(["layer", "create-rw", "c3", "--parent", "img", "--mount", missing])
        #expect(r.status != 0)
        #expect(r.stderr.contains(missing), "\(r.stderr)")
        let ls = try f.run(["layer", "ls", "--json"]).stdout
        #expect(!ls.contains("\"c3\""), "c3 was left behind: \(ls)")

        // -o without --mount is refused before anything is created.
        let refused = try f.run(["layer", "create-rw", "c4", "--parent", "img", "-o", "noatime"])
        #expect(refused.status != 0 && refused.stderr.contains("--mount"), "\(refused.stderr)")
        #expect(!(try f.run(["layer", "ls", "--json"]).stdout.contains("\"c4\"")))

        try f.ok(["umount", m1])
        try f.ok(["umount", m2])
        try f.waitForDaemons()
        for id in ["c1", "c2", "img"] { try f.ok(["layer", "rm", id]) }
        try f.expectNoLeaks()
    }
}
