import Foundation
import TestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Two hosts sharing one Ceph cluster (issue 16): two stores with their own roots and
/// rbd.prefix, the same rbd.catalogue, driven through the `thinfs` binary, each with its own
/// `thinfs-mount` daemon. Host B runs in a network namespace of its own, joined by a veth pair
/// (NetworkNamespace): the cluster, a test cluster of its own on the veth's host end
/// (10.213.16.1), is reached over that link, with B's own address. The rbd and rados CLIs
/// judge what is in the cluster.
@Suite("RBD two hosts", .serialized,
       .enabled(if: Host.canMountFUSE && Binaries.available && LayerFixture.canMakeImage && Ceph.available && NetworkNamespace.available,
                "needs /dev/fuse, root, the built binaries, busybox-static, ip and nsenter, and the Ceph packages with a test cluster (the reason is printed)"))
struct RBDSharingTests {
    @Test func twoHostsShareLayersOneWriterAndTakeOver() throws {
        // Host B's network, then the cluster on its link (stopped and removed in that order's
        // reverse, also on failure: the cluster, with every image in it, then the namespace).
        let net = try NetworkNamespace()
        defer { net.remove() }
        let scratch = TempDir()
        let cluster = CephCluster(dir: scratch.path + "/ceph", address: NetworkNamespace.hostAddress)
        defer { cluster.stop() }
        try cluster.start()

        let catalogue = "thinfs-catalogue-\(UUID().uuidString.prefix(8).lowercased())"
        let prefixA = Ceph.uniquePrefix("hosta"), prefixB = Ceph.uniquePrefix("hostb")
        let shared = ["rbd.catalogue=\(catalogue)"]
        let a = try LayerFixture(deferredDeletion: false, options: RBDLayerStoreTests.options(prefix: prefixA, conf: cluster.conf) + shared)
        let b = try LayerFixture(deferredDeletion: false, options: RBDLayerStoreTests.options(prefix: prefixB, conf: cluster.conf) + shared,
                                 netns: net.name)
        defer {
            b.tearDown()
            a.tearDown()
        }

        // Host A imports the image: unpacked, published.
        let made = try LayerFixture.shell("bash \(LayerFixture.packageRoot.path)/scripts/make-test-image.sh \(a.dir.path)/image")
        #expect(made.status == 0, "\(made.stderr)")
        let startedA = Date()
        let importedA = try a.run(["image", "import", a.dir.path + "/image/oci"])
        let unpackSeconds = Date().timeIntervalSince(startedA)
        #expect(importedA.status == 0, "\(importedA.stderr)")
        let top = try #require(importedA.stdout.split(separator: "\n").last.map(String.init))
        let imagesA = try cluster.images(prefix: prefixA)
        #expect(imagesA.count == 3, "\(imagesA)")
        let keys = try cluster.rados(["listomapkeys", catalogue]).stdout
        #expect(keys.contains("layer.\(top)"), "the catalogue's omap keys (rados listomapkeys): \(keys)")

        // Host B imports the same image: both layers found in the cluster, nothing unpacked
        // (no new image in B's prefix besides its base device, no tar applied).
        let imagesB = try cluster.images(prefix: prefixB)
        #expect(imagesB.count == 1, "\(imagesB)")
        let started = Date()
        let imported = try b.run(["image", "import", a.dir.path + "/image/oci"])
        let adoptSeconds = Date().timeIntervalSince(started)
        #expect(imported.status == 0, "\(imported.stderr)")
        #expect(imported.stdout.split(separator: "\n").last.map(String.init) == top)
        #expect(imported.stderr.contains("2 reused, 2 from the cluster"), "\(imported.stderr)")
        #expect(try cluster.images(prefix: prefixB) == imagesB)
        print("RBDSharingTests: image import: host A (unpack) \(String(format: "%.2f", unpackSeconds)) s, host B (adopt) \(String(format: "%.2f", adoptSeconds)) s")

        // The catalogue is the same from both hosts: A owns both layers, B uses them.
        let listA = try a.run(["cluster", "ls", "--json"]), listB = try b.run(["cluster", "ls", "--json"])
        #expect(listA.status == 0 && listB.status == 0, "\(listA.stderr)\(listB.stderr)")
        #expect(listA.stdout == listB.stdout)
        let parsed = try JSONSerialization.jsonObject(with: Data(listB.stdout.utf8)) as? [String: Any]
        let layers = parsed?["layers"] as? [[String: Any]] ?? []
        #expect(layers.count == 2, "\(listB.stdout)")
        for layer in layers {
            #expect(layer["host"] as? String == prefixA)
            #expect((layer["users"] as? [String: String])?.keys.sorted() == [prefixB], "\(layer)")
        }

        // B runs a container of the shared layer: A's unpacked files, read through the cluster.
        try b.ok(["layer", "create-rw", "cb", "--parent", top])
        let mntB = b.mountpoint("cb")
        try b.ok(["mount", "cb", mntB])
        // B's daemon serves it from B's network namespace.
        let daemonsB = b.daemons()
        #expect(daemonsB.count == 1 && daemonsB.allSatisfy { NetworkNamespace.of($0) == net.identity },
                "B's daemons \(daemonsB) in \(daemonsB.map { NetworkNamespace.of($0) ?? "?" }), not \(net.identity ?? "?")")
        let run = try LayerFixture.shell("chroot \(mntB) /bin/busybox sh -c 'echo on b > /b; /bin/busybox cat /b; /bin/busybox ls /bin/busybox'")
        #expect(run.status == 0 && run.stdout == "on b\n/bin/busybox\n", "\(run.stdout)\(run.stderr)")

        // A may not delete a layer B uses: refused, naming B; the image stays.
        let rm = try a.run(["layer", "rm", top])
        #expect(rm.status != 0 && rm.stderr.contains(prefixB), "\(rm.stdout)\(rm.stderr)")
        #expect(try cluster.images(prefix: prefixA) == imagesA)

        // A writes a container and fsyncs; B's take-over is refused while A's daemon holds it.
        try a.ok(["layer", "create-rw", "ca", "--parent", top])
        let mntA = a.mountpoint("ca")
        try a.ok(["mount", "ca", mntA])
        let payload = (0..<(3 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 2_654_435_761 >> 7) }
        let fd = Glibc.open(mntA + "/fsynced", O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        #expect(fd >= 0)
        let written = payload.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        #expect(written == payload.count)
        #expect(fsync(fd) == 0)
        Glibc.close(fd)
        let refused = try b.run(["cluster", "take-over", "ca", "--from", prefixA])
        // The holder is named by its client address (rbd_lock_get_owners): A's, not B's.
        #expect(refused.status != 0 && refused.stderr.contains("is locked exclusively by \(NetworkNamespace.hostAddress):"), "\(refused.stdout)\(refused.stderr)")

        // A's daemon dies mid-write; B takes the container over once Ceph has expired its watch.
        let daemonsA = a.daemons()
        #expect(daemonsA.count == 1 && daemonsA.allSatisfy { NetworkNamespace.of($0) != net.identity })
        let writer = Process()
        writer.executableURL = URL(fileURLWithPath: "/bin/dd")
        writer.arguments = ["if=/dev/urandom", "of=\(mntA)/unsynced", "bs=64k", "count=4096"]
        writer.standardError = FileHandle.nullDevice
        try writer.run()
        usleep(300_000)
        for pid in daemonsA { kill(pid, SIGKILL) }
        writer.waitUntilExit()
        umount2(mntA, Int32(MNT_DETACH))
        let killed = Date()
        var takeOver = try b.run(["cluster", "take-over", "ca", "--from", prefixA])
        while takeOver.status != 0, Date().timeIntervalSince(killed) < 60 {
            usleep(500_000)
            takeOver = try b.run(["cluster", "take-over", "ca", "--from", prefixA])
        }
        #expect(takeOver.status == 0, "\(takeOver.stderr)")
        print("RBDSharingTests: B took over A's container \(String(format: "%.1f", Date().timeIntervalSince(killed))) s after A was killed")
        let mntB2 = b.mountpoint("ca")
        try b.ok(["mount", "ca", mntB2])
        #expect(Sys.readFile(mntB2 + "/fsynced") == payload, "the fsynced file, read on host B")
        let listed = try b.run(["cluster", "ls"]).stdout
        #expect(listed.contains("ca\t") && listed.contains("\(prefixB)@"), "\(listed)")

        // B lets go. A's store no longer deletes what B now owns, mounted or not.
        try b.ok(["umount", mntB2])
        try b.ok(["umount", mntB])
        try b.waitForDaemons()
        let rmA = try a.run(["layer", "rm", "ca"])
        #expect(rmA.status != 0 && rmA.stderr.contains("belongs to store \(prefixB)"), "\(rmA.stdout)\(rmA.stderr)")
        let mountA = try a.run(["mount", "ca", a.mountpoint("ca-again")])
        #expect(mountA.status != 0 && mountA.stderr.contains("belongs to store \(prefixB)"), "\(mountA.stdout)\(mountA.stderr)")
        try a.waitForDaemons()

        // Then B's layers go: the containers' images, the shared layers' aliases only.
        for id in ["ca", "cb", top] { try b.ok(["layer", "rm", id]) }
        #expect(try cluster.images(prefix: prefixB) == imagesB)
        #expect(try cluster.images(prefix: prefixA) == imagesA)
        // Nobody else uses A's layer now: A deletes it.
        try a.ok(["layer", "rm", top])
        #expect(try cluster.images(prefix: prefixA).count == 2)
        try b.expectNoLeaks()
    }
}
