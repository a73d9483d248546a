import Foundation
import TestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Two hosts sharing one Ceph cluster across a network boundary (issue 16): host A in this
/// machine's network namespace, host B in a namespace of its own (`NetworkNamespace`) reaching
/// the cluster over a veth pair. The cluster is the test's own, on the veth's host-side address
/// (scripts/ceph/cluster.sh with THINFS_CEPH_ADDR): the CI step's cluster listens on 127.0.0.1,
/// which inside B's namespace is B's own loopback. Every `thinfs` command of B, and so its
/// `thinfs-mount` daemon, runs under `nsenter --net`. RBDSharingTests checks the same protocol
/// with both hosts on 127.0.0.1; here each check crosses the boundary: B adopts A's layer
/// through the catalogue with no unpack, both read the same catalogue, A's take-over of B's
/// container is refused naming B by its namespace's address, and after B's daemon is
/// SIGKILLed mid-write A takes over with what B fsynced intact.
///
/// Gated like the other RBD suites on the CI step's cluster being up (it runs in that step), and
/// on root and the ip and nsenter tools.
@Suite("RBD two hosts in network namespaces", .serialized,
       .enabled(if: Host.canMountFUSE && Binaries.available && LayerFixture.canMakeImage && Ceph.available
                    && NetworkNamespace.toolsAvailable,
                "needs /dev/fuse, root, ip and nsenter, the built binaries, busybox-static and a Ceph test cluster (the reason is printed)"))
struct RBDNetnsTests {
    static func payload(_ count: Int) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 2_654_435_761 >> 9) }
    }

    @Test func hostInItsOwnNetworkNamespaceSharesLocksAndIsTakenOver() throws {
        let scratch = TempDir()
        let net = try NetworkNamespace()
        defer { net.remove() }
        let cluster = CephCluster(dir: scratch.path + "/ceph", address: net.hostAddress)
        defer { cluster.stop() }
        try cluster.start()

        // B reaches the monitor only across the veth: its 127.0.0.1 is its own.
        let reach = try net.run(["/bin/bash", "-c", "exec 3<>/dev/tcp/\(net.hostAddress)/6789"])
        #expect(reach.status == 0, "B's namespace cannot reach the monitor at \(net.hostAddress):6789: \(reach.stderr)")
        let loopback = try net.run(["/bin/bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/6789"])
        #expect(loopback.status != 0, "B's namespace reaches a monitor on 127.0.0.1: it is not isolated")

        let catalogue = "thinfs-catalogue-netns"
        let prefixA = Ceph.uniquePrefix("nsa"), prefixB = Ceph.uniquePrefix("nsb")
        func options(_ prefix: String) -> [String] {
            ["thinfs.backend=rbd", "rbd.conf=\(cluster.conf)", "rbd.pool=rbd", "rbd.prefix=\(prefix)",
             "dm.basesize=256M", "rbd.catalogue=\(catalogue)"]
        }
        let a = try LayerFixture(deferredDeletion: false, options: options(prefixA))
        let b = try LayerFixture(deferredDeletion: false, options: options(prefixB), wrapper: net.enter)
        defer {
            b.tearDown()
            a.tearDown()
        }

        // A imports the image (unpacked, published); B, across the boundary, adopts both layers.
        let top = try RBDLayerStoreTests.importImage(a)
        let imagesA = try cluster.images(prefix: prefixA), imagesB = try cluster.images(prefix: prefixB)
        #expect(imagesA.count == 3 && imagesB.count == 1, "A: \(imagesA), B: \(imagesB)")
        let imported = try b.run(["image", "import", a.dir.path + "/image/oci"])
        #expect(imported.status == 0, "\(imported.stderr)")
        #expect(imported.stdout.split(separator: "\n").last.map(String.init) == top)
        #expect(imported.stderr.contains("2 reused, 2 from the cluster"), "B's import: \(imported.stderr)")
        #expect(try cluster.images(prefix: prefixB) == imagesB, "B made images although the layers were in the cluster")

        // The catalogue, read from each side, is one.
        let listA = try a.run(["cluster", "ls", "--json"]), listB = try b.run(["cluster", "ls", "--json"])
        #expect(listA.status == 0 && listB.status == 0, "\(listA.stderr)\(listB.stderr)")
        #expect(listA.stdout == listB.stdout)
        let layers = (try JSONSerialization.jsonObject(with: Data(listB.stdout.utf8)) as? [String: Any])?["layers"] as? [[String: Any]] ?? []
        #expect(layers.count == 2, "\(listB.stdout)")
        for layer in layers {
            #expect(layer["host"] as? String == prefixA)
            #expect((layer["users"] as? [String: String])?.keys.sorted() == [prefixB], "\(layer)")
        }

        // B writes a container of the shared layer; its daemon runs in B's namespace.
        try b.ok(["layer", "create-rw", "cb", "--parent", top])
        let mntB = b.mountpoint("cb")
        try b.ok(["mount", "cb", mntB])
        let daemonsB = b.daemons()
        try #require(daemonsB.count == 1, "\(daemonsB)")
        #expect(net.contains(daemonsB[0]), "B's daemon \(daemonsB[0]) is not in namespace \(net.name)")
        #expect(Sys.readFile(mntB + "/etc/hostname") == Array("thinfs-test-2\n".utf8), "the image's file, read on B")
        let payload = Self.payload(3 << 20)
        let fd = Glibc.open(mntB + "/fsynced", O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        #expect(fd >= 0)
        #expect(payload.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) } == payload.count)
        #expect(fsync(fd) == 0)
        Glibc.close(fd)

        // A may not take it while B's daemon holds the lock: refused, naming B by the address of
        // its namespace's side of the veth.
        let refused = try a.run(["cluster", "take-over", "cb", "--from", prefixB])
        #expect(refused.status != 0 && refused.stderr.contains("is locked exclusively by \(net.innerAddress):"),
                "A's take-over while B writes: \(refused.stdout)\(refused.stderr)")

        // B's daemon dies mid-write; A takes the container over once Ceph has expired its watch.
        try LayerFixture.loseHost(daemonsB, mountedAt: mntB, whileWriting: true)
        let (takeOver, waited) = try a.retryUntilSuccess(["cluster", "take-over", "cb", "--from", prefixB])
        #expect(takeOver.status == 0, "\(takeOver.stderr)")
        print("RBDNetnsTests: A took over B's container \(String(format: "%.1f", waited)) s after B's daemon was killed")
        let mntA = a.mountpoint("cb")
        try a.ok(["mount", "cb", mntA])
        #expect(Sys.readFile(mntA + "/fsynced") == payload, "the file B fsynced, read on A")
        let listed = try b.run(["cluster", "ls"]).stdout
        #expect(listed.contains("cb\t") && listed.contains("\(prefixA)@"), "the catalogue from B after the take-over: \(listed)")
        try a.ok(["umount", mntA])
        try a.waitForDaemons()

        // B's store no longer opens or deletes what A now owns.
        let mountB = try b.run(["mount", "cb", b.mountpoint("cb-again")])
        #expect(mountB.status != 0 && mountB.stderr.contains("belongs to store \(prefixA)"), "\(mountB.stdout)\(mountB.stderr)")
        try b.waitForDaemons()
        let rmB = try b.run(["layer", "rm", "cb"])
        #expect(rmB.status != 0 && rmB.stderr.contains("belongs to store \(prefixA)"), "\(rmB.stdout)\(rmB.stderr)")

        // Everything goes: A's container (B's store then drops its stale row for it as it
        // opens), B's alias of the shared layer, A's layer.
        try a.ok(["layer", "rm", "cb"])
        try b.ok(["layer", "rm", top])
        try a.ok(["layer", "rm", top])
        #expect(try cluster.images(prefix: prefixB) == imagesB)
        #expect(try cluster.images(prefix: prefixA).count == 2, "A's base device and the image's bottom layer")
        try a.expectNoLeaks()
        // B's SIGKILLed daemon left its control socket (the next daemon replaces it); nothing
        // of B's runs or is mounted.
        #expect(b.daemons().isEmpty)
        #expect(!(Host.procFile("/proc/mounts") ?? "").contains(b.dir.path), "a mount of B's is left")
        #expect(net.pids().isEmpty, "processes left in B's namespace: \(net.pids())")
    }
}
