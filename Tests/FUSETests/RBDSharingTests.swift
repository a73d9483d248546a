import Foundation
import TestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Two hosts sharing one Ceph cluster (issue 16): two stores with their own roots and
/// rbd.prefix, the same rbd.catalogue, driven through the `thinfs` binary, each with its own
/// `thinfs-mount` daemon. The rbd and rados CLIs judge what is in the cluster.
@Suite("RBD two hosts", .serialized,
       .enabled(if: Host.canMountFUSE && Binaries.available && LayerFixture.canMakeImage && Ceph.available,
                "needs /dev/fuse, root, the built binaries, busybox-static and a Ceph test cluster (the reason is printed)"))
struct RBDSharingTests {
    static func rados(_ args: [String]) throws -> Oracle.Result {
        try Oracle.run("/usr/bin/rados", ["-c", Ceph.confPath, "-p", Ceph.pool] + args)
    }

    /// Removes what a failed test left: each image's snapshots (unprotected), then the image;
    /// clones first (their parents' snapshots cannot go before them), so prefixes in that order.
    static func removeImages(prefixes: [String]) {
        for prefix in prefixes {
            for image in (try? Ceph.images(prefix: prefix))?.reversed() ?? [] {
                let spec = "\(Ceph.pool)/\(image)"
                let snaps = (try? Ceph.rbd(["snap", "ls", spec, "--format", "json"]))?.stdout ?? "[]"
                let names = ((try? JSONSerialization.jsonObject(with: Data(snaps.utf8))) as? [[String: Any]] ?? []).compactMap { $0["name"] as? String }
                for snap in names {
                    _ = try? Ceph.rbd(["snap", "unprotect", "\(spec)@\(snap)"])
                    _ = try? Ceph.rbd(["snap", "rm", "--no-progress", "\(spec)@\(snap)"])
                }
                _ = try? Ceph.rbd(["rm", "--no-progress", spec])
            }
        }
    }

    @Test func twoHostsShareLayersOneWriterAndTakeOver() throws {
        let catalogue = "thinfs-catalogue-\(UUID().uuidString.prefix(8).lowercased())"
        let prefixA = Ceph.uniquePrefix("hosta"), prefixB = Ceph.uniquePrefix("hostb")
        let shared = ["rbd.catalogue=\(catalogue)"]
        let a = try LayerFixture(deferredDeletion: false, options: RBDLayerStoreTests.options(prefix: prefixA) + shared)
        let b = try LayerFixture(deferredDeletion: false, options: RBDLayerStoreTests.options(prefix: prefixB) + shared)
        defer {
            b.tearDown()
            a.tearDown()
            Self.removeImages(prefixes: [prefixB, prefixA])
            _ = try? Self.rados(["rm", catalogue])
        }

        // Host A imports the image: unpacked, published.
        let made = try LayerFixture.shell("bash \(LayerFixture.packageRoot.path)/scripts/make-test-image.sh \(a.dir.path)/image")
        #expect(made.status == 0, "\(made.stderr)")
        let startedA = Date()
        let importedA = try a.run(["image", "import", a.dir.path + "/image/oci"])
        let unpackSeconds = Date().timeIntervalSince(startedA)
        #expect(importedA.status == 0, "\(importedA.stderr)")
        let top = try #require(importedA.stdout.split(separator: "\n").last.map(String.init))
        let imagesA = try Ceph.images(prefix: prefixA)
        #expect(imagesA.count == 3, "\(imagesA)")
        let keys = try Self.rados(["listomapkeys", catalogue]).stdout
        #expect(keys.contains("layer.\(top)"), "the catalogue's omap keys (rados listomapkeys): \(keys)")

        // Host B imports the same image: both layers found in the cluster, nothing unpacked
        // (no new image in B's prefix besides its base device, no tar applied).
        let imagesB = try Ceph.images(prefix: prefixB)
        #expect(imagesB.count == 1, "\(imagesB)")
        let started = Date()
        let imported = try b.run(["image", "import", a.dir.path + "/image/oci"])
        let adoptSeconds = Date().timeIntervalSince(started)
        #expect(imported.status == 0, "\(imported.stderr)")
        #expect(imported.stdout.split(separator: "\n").last.map(String.init) == top)
        #expect(imported.stderr.contains("2 reused, 2 from the cluster"), "\(imported.stderr)")
        #expect(try Ceph.images(prefix: prefixB) == imagesB)
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
        let run = try LayerFixture.shell("chroot \(mntB) /bin/busybox sh -c 'echo on b > /b; /bin/busybox cat /b; /bin/busybox ls /bin/busybox'")
        #expect(run.status == 0 && run.stdout == "on b\n/bin/busybox\n", "\(run.stdout)\(run.stderr)")

        // A may not delete a layer B uses: refused, naming B; the image stays.
        let rm = try a.run(["layer", "rm", top])
        #expect(rm.status != 0 && rm.stderr.contains(prefixB), "\(rm.stdout)\(rm.stderr)")
        #expect(try Ceph.images(prefix: prefixA) == imagesA)

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
        // The holder is named by its client address (rbd_lock_get_owners).
        #expect(refused.status != 0 && refused.stderr.contains("is locked exclusively by 127.0.0.1:"), "\(refused.stdout)\(refused.stderr)")

        // A's daemon dies mid-write; B takes the container over once Ceph has expired its watch.
        let daemonsA = a.daemons()
        #expect(daemonsA.count == 1)
        try LayerFixture.loseHost(daemonsA, mountedAt: mntA, whileWriting: true)
        let (takeOver, waited) = try b.retryUntilSuccess(["cluster", "take-over", "ca", "--from", prefixA])
        #expect(takeOver.status == 0, "\(takeOver.stderr)")
        print("RBDSharingTests: B took over A's container \(String(format: "%.1f", waited)) s after A was killed")
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
        #expect(try Ceph.images(prefix: prefixB) == imagesB)
        #expect(try Ceph.images(prefix: prefixA) == imagesA)
        // Nobody else uses A's layer now: A deletes it.
        try a.ok(["layer", "rm", top])
        #expect(try Ceph.images(prefix: prefixA).count == 2)
        try b.expectNoLeaks()
    }
}
