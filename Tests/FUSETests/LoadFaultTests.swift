import Foundation
import TestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Issue 14, §4, faults and load, through the built binaries:
/// - the daemon (`thinfs serve`, or the on-demand `thinfs-mount` daemon) SIGKILLed while eight
///   mounted containers write and fsync: nothing fsynced is lost, no device is orphaned, the
///   locks are free, the dead mounts are cleaned and logged, and every ext4 and the pool check
///   clean;
/// - a bounded stress of concurrent create, mount, write, umount and rm through serve, with the
///   mounts, loop devices, thin devices, and serve's threads and file descriptors counted before
///   and after (`THINFS_STRESS_SECONDS`, default 60).
@Suite("Faults and load",
       .enabled(if: Host.canMountFUSE && Binaries.available && Oracle.available,
                "needs /dev/fuse, root, mke2fs, thin_check and the built binaries"),
       .serialized)
struct LoadFaultTests {
    enum Daemon: String, CaseIterable, Sendable, CustomTestStringConvertible {
        case serve, mountDaemon
        var testDescription: String { rawValue }
    }

    /// Small filesystems: e2fsck reads every device at the end.
    static let options = ["dm.basesize=64M", "dm.loopdatasize=2G", "dm.loopmetadatasize=32M"]
    static let deviceBytes = "64M"

    /// The bytes of file `file` of container `container`: different in every file and every
    /// block, so a block landing in the wrong file or at the wrong offset shows.
    static func content(container: Int, file: Int, size: Int) -> [UInt8] {
        var rng = SeededRandom(seed: UInt64(container) << 32 | UInt64(file))
        var bytes = [UInt8](repeating: 0, count: size)
        var k = 0
        while k < size {
            let word = rng.next()
            for b in 0..<8 where k + b < size { bytes[k + b] = UInt8(truncatingIfNeeded: word >> (b * 8)) }
            k += 8
        }
        return bytes
    }

    /// Runs `body(i)` for i in 0..<count, each on its own thread (FUSE calls block; a thread pool
    /// of two cores' width would serialize them), and waits for all.
    static func onThreads(_ count: Int, _ body: @escaping @Sendable (Int) -> Void) -> DispatchGroup {
        let group = DispatchGroup()
        for i in 0..<count {
            group.enter()
            Thread {
                body(i)
                group.leave()
            }.start()
        }
        return group
    }

    /// An fd of `path`'s directory fsynced: a new name is durable once its directory is (fsync(2)).
    static func syncDirectory(_ path: String) -> Int32 {
        let fd = open(path, O_RDONLY | O_DIRECTORY)
        guard fd >= 0 else { return errno }
        defer { close(fd) }
        return fsync(fd) == 0 ? 0 : errno
    }

    @Test(arguments: Daemon.allCases)
    func sigkillUnderLoadLosesNothingFsynced(_ kind: Daemon) throws {
        let f = try LayerFixture(deferredDeletion: false, options: Self.options)
        defer { f.tearDown() }
        let baseDevices = try f.devices()
        var serve: ServeProcess? = kind == .serve ? try ServeProcess(root: f.root) : nil
        defer { serve?.tearDown() }
        try serve?.waitReady()

        try f.ok(["layer", "create", "img"])
        let ids = (0..<8).map { "c\($0)" }
        let mounts = ids.map { f.mountpoint($0) }
        for (id, mnt) in zip(ids, mounts) {
            try f.ok(["layer", "create-rw", id, "--parent", "img"])
            try f.ok(["mount", id, mnt])
        }
        let killed: pid_t
        if let serve {
            killed = serve.pid
            #expect(f.daemons().isEmpty, "thinfs mount started its own daemon beside serve: \(f.daemons())")
        } else {
            let daemons = f.daemons()
            #expect(daemons.count == 1, "one daemon serves every mount of a root: \(daemons)")
            killed = try #require(daemons.first)
        }

        // Eight writers, one per container: files of 4 KiB to 192 KiB, each written, fsynced,
        // and its directory fsynced; only then is it recorded as durable.
        let durable = Locked<[Int: [(file: Int, size: Int)]]>([:])
        let killedYet = Locked(false)
        let errors = Locked<[String]>([])
        let writers = Self.onThreads(8) { i in
            var n = 0
            while true {
                let size = 4096 + (n &* 7919 &+ i &* 104_729) % (188 << 10)
                let bytes = Self.content(container: i, file: n, size: size)
                let path = mounts[i] + "/w\(n)"
                let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
                var failure: (String, Int32)?
                if fd < 0 {
                    failure = ("open", errno)
                } else {
                    let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
                    if written != bytes.count {
                        failure = ("write", written < 0 ? errno : EIO)
                    } else if fsync(fd) != 0 {
                        failure = ("fsync", errno)
                    }
                    close(fd)
                    if failure == nil {
                        let e = Self.syncDirectory(mounts[i])
                        if e != 0 { failure = ("fsync of the directory", e) }
                    }
                }
                if case let (call, e)? = failure {
                    // Before the kill nothing may fail; after it, the dead connection answers
                    // ENOTCONN to new requests and ECONNABORTED to the ones it cut off.
                    let afterKill = killedYet.withLock { $0 }
                    if !afterKill || (e != ENOTCONN && e != ECONNABORTED) {
                        errors.withLock { $0.append("c\(i) w\(n): \(call) failed \(afterKill ? "after" : "before") the kill: \(String(cString: strerror(e)))") }
                    }
                    return
                }
                durable.withLock { $0[i, default: []].append((file: n, size: size)) }
                n += 1
            }
        }

        // Kill once every writer has made a few files durable and is busy with the next.
        let started = Date()
        let warmed = eventually(60) {
            Date().timeIntervalSince(started) > 2 && durable.withLock { d in (0..<8).allSatisfy { (d[$0]?.count ?? 0) >= 3 } }
        }
        killedYet.withLock { $0 = true }
        kill(killed, SIGKILL)
        try #require(warmed, "the writers did not get going within 60 s: \(durable.withLock { $0.mapValues(\.count) })")
        try #require(eventually(20) { Binaries.exited(killed) }, "pid \(killed) outlived SIGKILL")
        try #require(writers.wait(timeout: .now() + 60) == .success, "a writer hung on the dead mounts")
        #expect(errors.withLock { $0 }.isEmpty, "\(errors.withLock { $0 })")
        let made = durable.withLock { $0 }
        print("daemon killed under load (\(kind)): \(made.values.map(\.count).reduce(0, +)) files fsynced in 8 containers")

        // Dead: once the kernel's cached attributes of the mount's root expire (1 s), a stat asks.
        for mnt in mounts {
            var last: (Int32, Int32) = (0, 0)
            let dead = eventually(10) {
                var st = stat()
                last = (stat(mnt, &st), errno)
                return last.0 != 0 && (last.1 == ENOTCONN || last.1 == ECONNABORTED)
            }
            #expect(dead, "\(mnt) answers after the kill: rc \(last.0), errno \(last.1)")
        }

        // A new daemon: it starts (the pool lock and the store lock died with the old one),
        // detaches every dead mount, and says so.
        if kind == .serve {
            serve?.tearDown()
            serve = try ServeProcess(root: f.root)
            try serve?.waitReady()
            let log = serve?.log ?? ""
            for mnt in mounts {
                #expect(!Host.isMounted(mnt), "the restarted serve left the dead mount at \(mnt)")
                #expect(log.contains(mnt), "serve did not report the stale mount \(mnt):\n\(log)")
            }
            try f.ok(["mount", ids[0], mounts[0]])
        } else {
            try f.ok(["mount", ids[0], mounts[0]])
            for mnt in mounts.dropFirst() { #expect(!Host.isMounted(mnt), "the next daemon left the dead mount at \(mnt)") }
        }
        let records = (try? FileManager.default.contentsOfDirectory(atPath: f.root + "/locks")) ?? []
        #expect(!records.contains { $0.contains(".holder.\(killed).") }, "the killed daemon's busy-lock records are left: \(records)")

        // Every fsynced file has its bytes.
        for (i, mnt) in mounts.enumerated() {
            if i > 0 { try f.ok(["mount", ids[i], mnt]) }
            for (file, size) in made[i] ?? [] {
                let back = Sys.readFile(mnt + "/w\(file)")
                #expect(back == Self.content(container: i, file: file, size: size),
                        "c\(i)/w\(file): fsynced with \(size) bytes, read back \(back?.count ?? -1) different bytes")
            }
        }

        // No orphan: the store's layers and the base device are the pool's devices.
        let listed = try f.run(["layer", "ls", "--json"])
        let rows = try JSONSerialization.jsonObject(with: Data(listed.stdout.utf8)) as? [[String: Any]] ?? []
        let layerDevices = Set(rows.compactMap { row in (row["deviceID"] as? Int).map { UInt32($0) } })
        #expect(Set(rows.compactMap { $0["id"] as? String }) == Set(ids + ["img"]), "\(listed.stdout)\(listed.stderr)")
        for mnt in mounts { try f.ok(["umount", mnt]) }
        if let serve {
            #expect(try serve.stop(SIGTERM) == .exited(0), "\(serve.log)")
        } else {
            try f.waitForDaemons()
        }
        let devices = try f.devices()
        #expect(devices == baseDevices.union(layerDevices), "thin devices \(devices.sorted()) are not the base \(baseDevices.sorted()) and the layers' \(layerDevices.sorted())")
        #expect(try Oracle.check(f.metadata))
        try Self.expectCleanFilesystems(f, devices: devices)
        try f.expectNoLeaks()
    }

    /// `e2fsck -fn` of every device, read out of the pool (no daemon may run).
    static func expectCleanFilesystems(_ f: LayerFixture, devices: Set<UInt32>) throws {
        for device in devices.sorted() {
            // A clean filesystem asks no question; e2fsck -n exits 0 for some it answers "no".
            let fsck = try LayerFixture.checkFilesystem(root: f.root, device: device, length: "\(deviceBytes)", image: f.dir.path + "/fsck.img").fsck
            #expect(fsck.status == 0 && !fsck.stdout.contains("Fix? no"), "e2fsck -fn of device \(device): \(fsck.stdout)\(fsck.stderr)")
        }
    }

    // MARK: Stress

    /// What leaks would show as: counted before and after.
    struct Census: Equatable, CustomStringConvertible {
        var threads: Int
        var descriptors: Int
        var mounts: Int
        var loops: Int
        var description: String { "\(threads) threads, \(descriptors) fds, \(mounts) mounts, \(loops) loop devices" }

        /// `pid`'s threads (/proc/PID/task) and descriptors (/proc/PID/fd); the mounts in this
        /// namespace under `dir` or of `root` (/proc/self/mountinfo), and the loop devices
        /// backed by a file under `dir` (other work on the host has its own).
        static func take(pid: pid_t, dir: String, root: String) -> Census {
            let count = { (path: String) in (try? FileManager.default.contentsOfDirectory(atPath: path).count) ?? -1 }
            let mountinfo = (try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8)) ?? ""
            let mounts = mountinfo.split(separator: "\n").filter { $0.contains(dir) || $0.contains("thinfs:\(root):") }.count
            let blocks = (try? FileManager.default.contentsOfDirectory(atPath: "/sys/block")) ?? []
            let loops = blocks.filter { name in
                guard name.hasPrefix("loop"),
                      let backing = try? String(contentsOfFile: "/sys/block/\(name)/loop/backing_file", encoding: .utf8) else { return false }
                return backing.contains(dir)
            }.count
            return Census(threads: count("/proc/\(pid)/task"), descriptors: count("/proc/\(pid)/fd"), mounts: mounts, loops: loops)
        }
    }

    static var stressSeconds: Double {
        ProcessInfo.processInfo.environment["THINFS_STRESS_SECONDS"].flatMap(Double.init) ?? 60
    }

    /// Workers loop create-rw, mount, write and fsync, read back, umount and rm through serve
    /// for a bounded time; every other cycle removes the layer while it is mounted (deferred
    /// deletion, done at the umount). Afterwards: the same threads and descriptors in serve as
    /// after a warm-up round, no mount or loop device, the pool's devices the base and the
    /// image's, and thin_check clean.
    @Test func concurrentLifecycleThroughServeLeaksNothing() throws {
        let f = try LayerFixture(deferredDeletion: true, options: Self.options)
        defer { f.tearDown() }
        let baseDevices = try f.devices()
        let serve = try ServeProcess(root: f.root)
        defer { serve.tearDown() }
        try serve.waitReady()
        try f.ok(["layer", "create", "img"])
        let expectedDevices = baseDevices.union([try f.layerDevice("img")])
        let start = Census.take(pid: serve.pid, dir: f.dir.path, root: f.root)

        let workers = 4
        let cycles = Locked(0)
        let failures = Locked<[String]>([])
        @Sendable func cycle(_ worker: Int, _ k: Int) throws {
            let id = "s\(worker)-\(k)", mnt = f.mountpoint(id)
            try f.ok(["layer", "create-rw", id, "--parent", "img"])
            try f.ok(["mount", id, mnt])
            let bytes = Self.content(container: worker, file: k, size: 256 << 10)
            let fd = open(mnt + "/data", O_WRONLY | O_CREAT | O_TRUNC, 0o644)
            guard fd >= 0 else { throw LayerFixture.Failure("\(id): open: \(String(cString: strerror(errno)))") }
            let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            let synced = fsync(fd) == 0
            close(fd)
            guard written == bytes.count, synced, Sys.readFile(mnt + "/data") == bytes else {
                throw LayerFixture.Failure("\(id): the file did not write, fsync and read back")
            }
            if k % 2 == 1 {
                try f.ok(["layer", "rm", id])   // mounted: deferred until the umount
                try f.ok(["umount", mnt])
            } else {
                try f.ok(["umount", mnt])
                try f.ok(["layer", "rm", id])
            }
            rmdir(mnt)
            cycles.withLock { $0 += 1 }
        }
        func round(until deadline: Date?, from first: Int) -> DispatchGroup {
            Self.onThreads(workers) { w in
                var k = first
                repeat {
                    do { try cycle(w, k) } catch {
                        failures.withLock { $0.append("\(error)") }
                        return
                    }
                    k += 1
                } while deadline.map { Date() < $0 } ?? false
            }
        }

        // A warm-up round of both kinds of cycle starts whatever serve starts lazily.
        _ = round(until: nil, from: 0).wait(timeout: .now() + 120)
        _ = round(until: nil, from: 1).wait(timeout: .now() + 120)
        try #require(failures.withLock { $0 }.isEmpty, "\(failures.withLock { $0 })")
        // Idle threads of the libraries' pools end a few seconds after their last work.
        usleep(5_000_000)
        let warm = Census.take(pid: serve.pid, dir: f.dir.path, root: f.root)

        let seconds = Self.stressSeconds
        let began = Date()
        let finished = round(until: began.addingTimeInterval(seconds), from: 2).wait(timeout: .now() + seconds + 180)
        #expect(finished == .success, "the stress did not end within 180 s of its \(Int(seconds)) s")
        #expect(failures.withLock { $0 }.isEmpty, "\(failures.withLock { $0 })")
        let done = cycles.withLock { $0 }
        #expect(serve.isRunning, "serve died under the stress:\n\(serve.log)")

        // A leak grows with the cycles (hundreds); the pools' idle threads end within seconds.
        var after = Census.take(pid: serve.pid, dir: f.dir.path, root: f.root)
        _ = eventually(30) {
            after = Census.take(pid: serve.pid, dir: f.dir.path, root: f.root)
            return after.threads <= warm.threads && after.descriptors <= warm.descriptors
        }
        print("stress: \(done) cycles of create-rw, mount, write+fsync, umount, rm by \(workers) workers in \(Int(Date().timeIntervalSince(began))) s; "
              + "serve at the start: \(start); after a warm-up: \(warm); after the stress: \(after)")
        #expect(done > workers * 2)
        #expect(after.threads <= warm.threads, "serve's threads grew from \(warm.threads) to \(after.threads) over \(done) cycles")
        #expect(after.descriptors <= warm.descriptors, "serve's descriptors grew from \(warm.descriptors) to \(after.descriptors) over \(done) cycles")
        #expect(after.mounts == start.mounts && after.loops == start.loops, "before: \(start); after: \(after)")

        let ls = try f.run(["layer", "ls", "--json"])
        let rows = try JSONSerialization.jsonObject(with: Data(ls.stdout.utf8)) as? [[String: Any]] ?? []
        #expect(rows.compactMap { $0["id"] as? String } == ["img"], "layers left: \(ls.stdout)")
        #expect(try serve.stop(SIGTERM) == .exited(0), "\(serve.log)")
        let devicesAfter = try f.devices()
        #expect(devicesAfter == expectedDevices, "thin devices left: \(devicesAfter.sorted()), expected \(expectedDevices.sorted())")
        #expect(try Oracle.check(f.metadata))
        try f.expectNoLeaks()
    }
}
