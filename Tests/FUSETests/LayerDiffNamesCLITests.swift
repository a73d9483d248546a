import Foundation
import TestSupport
import Testing

/// python3 makes the unix socket (the shell has no tool for one).
private let hostHasPython = (try? Oracle.run("/usr/bin/env", ["python3", "-c", "import socket"]).status) == 0

/// `thinfs layer diff` of a container written through a real FUSE mount, as issue 10 reported it: the
/// ca-certificates name that killed the diff with SIGSEGV, a symlink to a non-ASCII name (written empty),
/// a non-ASCII hard link, and the unix socket a killed daemon leaves behind (which failed the diff).
@Suite("Layer diff through the CLI: non-ASCII names and sockets", .serialized,
       .enabled(if: Host.canMountFUSE && Binaries.available && Oracle.available && hostHasPython,
                "needs /dev/fuse, root, the built binaries, thin-provisioning-tools and python3"))
struct LayerDiffNamesCLITests {
    static let pem = "etc/ssl/certs/NetLock_Arany_=Class_Gold=_F\u{151}tan\u{FA}s\u{ED}tv\u{E1}ny.pem"

    @Test func diffOfAContainerWithNonASCIINamesAndASocket() throws {
        let f = try LayerFixture(deferredDeletion: false)
        defer { f.tearDown() }
        try f.ok(["layer", "create", "img"])
        try f.ok(["layer", "create-rw", "c1", "--parent", "img"])
        let mnt = f.mountpoint("c1")
        try f.ok(["mount", "c1", mnt])
        let write = try LayerFixture.shell("""
            cd '\(mnt)' && printf hi > 'caf\u{E9}.txt' && ln -s 'caf\u{E9}.txt' l && ln 'caf\u{E9}.txt' 'lien-\u{E9}' \
            && mkdir -p etc/ssl/certs && printf cert > '\(Self.pem)' \
            && python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind("daemon.sock")'
            """)
        #expect(write.status == 0, "\(write.stderr)")
        try f.ok(["umount", mnt])
        // With the daemon gone, the diff runs in the CLI's own process, and its warning reaches its stderr.
        try f.waitForDaemons()

        let tar = f.dir.path + "/c1.tar"
        let diff = try f.run(["layer", "diff", "c1", "--output", tar])
        #expect(diff.status == 0, "\(diff.stderr)")
        #expect(diff.stderr.contains("left a unix socket out of the layer diff") && diff.stderr.contains("daemon.sock"), "\(diff.stderr)")

        let listing = try LayerFixture.shell("tar -tvf '\(tar)'")
        #expect(listing.status == 0 && listing.stderr.isEmpty, "\(listing.stderr)")
        for line in ["caf\u{E9}.txt", "l -> caf\u{E9}.txt", "lien-\u{E9} link to caf\u{E9}.txt", Self.pem] {
            #expect(listing.stdout.contains(line), "GNU tar lists \(line):\n\(listing.stdout)")
        }
        #expect(!listing.stdout.contains("daemon.sock"))

        // Applied to a fresh container, it gives the same names and link, with no socket.
        try f.ok(["layer", "create-rw", "c2", "--parent", "img"])
        try f.ok(["layer", "apply-diff", "c2", tar])
        let mnt2 = f.mountpoint("c2")
        try f.ok(["mount", "c2", mnt2, "--ro"])
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: mnt2 + "/l") == "caf\u{E9}.txt")
        let names = Set(try FileManager.default.contentsOfDirectory(atPath: mnt2))
        #expect(names == ["caf\u{E9}.txt", "l", "lien-\u{E9}", "etc", "lost+found"], "\(names)")
        #expect(FileManager.default.contents(atPath: mnt2 + "/" + Self.pem) == Data("cert".utf8))
        try f.ok(["umount", mnt2])
        try f.waitForDaemons()
        for id in ["c1", "c2", "img"] { try f.ok(["layer", "rm", id]) }
        try f.expectNoLeaks()
    }
}
