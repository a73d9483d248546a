import Foundation
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// Growing a layer's filesystem: a container given a size at creation (`create-rw --size`,
/// `docker run --storage-opt size=`), a layer that exists (`thinfs layer resize`, seed 003's
/// `dmsetup load` + `dmsetup resume` + `resize2fs` done by hand), and the base device when
/// dm.basesize grows (`growBase`), as Docker's devicemapper did.
///
/// libext2fs offers no resize call: resizing is e2fsprogs' `resize2fs` program. It works on an
/// image file as well as a disk, so the thin device is served to it as one file through the
/// FUSE server (`DeviceFileVolume`), in this process, on a private mount point:
///
///     ROOT/tmp/resize-XXXX/device ──FUSE──▶ DeviceFileVolume ──▶ thin device (new size)
///     e2fsck -fy  ROOT/tmp/resize-XXXX/device      unmounted: resize2fs insists on a fresh check
///     resize2fs   ROOT/tmp/resize-XXXX/device      grows to the file's size
///
/// A layer this process serves read-write (a mounted container) is grown in place, with no
/// unmount: its volume is flushed and held still, libext2fs's handle closed, the device opened
/// again at the new size, `resize2fs -f` run on it, and the handle opened again
/// (`VolumeGroup.Member.grow`, `Volume.reopen`). FUSE requests wait meanwhile; open files stay
/// open (growing keeps inode numbers), and statfs answers the new size at once. No e2fsck
/// there: a live filesystem has inodes that are unlinked but still open, which a check would free.
///
/// The device written is never committed on its own: the group commit after the resize makes
/// it durable with every other open volume's state (`VolumeGroup`).
///
/// The recorded size goes up before the filesystem does: a crash leaves a device larger than its
/// filesystem (harmless), never the other way round. A resize to the recorded size runs
/// resize2fs again, which finishes one that was interrupted (and does nothing otherwise).
extension LayerStore {
    struct ResizeFailure: Swift.Error, CustomStringConvertible {
        /// What was grown: "layer ID", or "the base device".
        var subject: String
        var step: String
        var output: String
        var description: String { "\(subject): \(step) failed: \(output)" }
    }

    /// `thinfs layer resize`: grows layer `id`'s thin device and filesystem to `size` bytes,
    /// mounted (by this process: the daemon serving it) or not. Shrinking is refused, naming
    /// both sizes; so is a layer another process holds, or one mounted read-only.
    @discardableResult
    public func resizeLayer(_ id: String, to size: UInt64) throws -> Layer {
        try requireWritable("resizing layer \(id)")
        try Self.validate(id: id)
        return try locked {
            var layer = try liveLayer(id)
            guard size >= layer.size else { throw Error.shrinkRefused(id, size: size, current: layer.size) }
            guard size % 4096 == 0 else { throw Error.unsupported("layer \(id): size \(size) must be a multiple of 4K") }
            // As in create: the size is stored as SQLite's signed integer, and Int64(size) traps past Int64.max.
            guard size <= ThinDevice.maximumSize else {
                throw Error.invalidArgument(what: "size of layer \(id)", value: "\(size)",
                                            reason: "above the largest a thin device can have (\(ThinDevice.maximumSize) bytes)")
            }
            if let child = try children(of: id).first { throw Error.parentFrozen(id, child: child.id) }
            if let writer = openWriters[id] {
                try db.execute("UPDATE layers SET size = ? WHERE id = ?", [.integer(Int64(size)), .text(layer.id)])
                try writer.member.grow(to: size) { device in
                    try resize2fs(device, name: "layer \(id)", check: false)
                }
            } else {
                let claimed = try claimWaitingOutAMoment(layer)
                guard let exclusive = claimed.lock else {
                    let holder = claimed.holder?.description ?? "in use"
                    throw Error.busy(id, holder: "\(holder); a mounted layer grows only through the daemon that serves it read-write")
                }
                defer { exclusive.release() }
                try growFilesystem(of: layer, to: size)
            }
            logger.info("resized layer", metadata: ["layer": "\(id)", "size": "\(size)", "was": "\(layer.size)"])
            layer.size = size
            return layer
        }
    }

    /// A bigger dm.basesize on a store that has a base device (`thinfs serve --storage-opt`,
    /// the Docker plugin's Init): the base device and its filesystem grow, so layers made from
    /// the base from now on (new images, and their containers) have the new size; layers that
    /// exist keep theirs, as with devicemapper. A smaller one is refused, naming both sizes.
    public func growBase(to size: UInt64) throws {
        try requireWritable("growing the base device")
        try locked {
            let base = self.base
            guard size >= base.size else { throw Error.baseShrinkRefused(root: root, size: size, current: base.size) }
            guard size > base.size else { return }
            guard size % 4096 == 0 else { throw Error.unsupported("dm.basesize \(size) must be a multiple of 4K") }
            var options = self.options
            options.baseSize = size
            let encoded = String(decoding: try JSONEncoder().encode(options), as: UTF8.self)
            // Recorded first, as for a layer: a crash leaves a device larger than its filesystem.
            try db.transaction {
                try Self.setSetting(db, "base.size", String(size))
                try Self.setSetting(db, "options", encoded)
            }
            var grown = base
            grown.size = size
            settings.withLock { $0 = (options, grown) }
            let device = try pool.openDevice(base.deviceID, size: size)
            defer { device.close() }
            try resize2fs(MemberDevice(device), name: "the base device", check: true)
            try volumes.commit()
            logger.notice("grew the base device (dm.basesize)", metadata: ["base.size": "\(size)", "was": "\(base.size)"])
        }
    }

    /// Grows an unmounted layer (`claim`ed, or just made) to `size`.
    func growFilesystem(of layer: Layer, to size: UInt64) throws {
        try db.execute("UPDATE layers SET size = ? WHERE id = ?", [.integer(Int64(size)), .text(layer.id)])
        let device = try pool.openDevice(layer.deviceID, size: size)
        defer { device.close() }
        try resize2fs(MemberDevice(device), name: "layer \(layer.id)", check: true)
        try volumes.commit()
        logger.info("grew a layer's filesystem", metadata: ["layer": "\(layer.id)", "size": "\(size)"])
    }

    /// Runs resize2fs on `device`, served as a file (see the table above); `check`: e2fsck -fy
    /// first (an unmounted filesystem), otherwise `resize2fs -f` (one held still under a mount).
    private func resize2fs(_ device: BlockDevice, name: String, check: Bool) throws {
        let mountpoint = scratchDirectory + "/resize-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: mountpoint, withIntermediateDirectories: true)
        defer { rmdir(mountpoint) }
        let server = FUSEServer(volume: DeviceFileVolume(device: device), mountpoint: mountpoint,
                                options: .init(readOnly: false, allowOther: false, source: "thinfs-resize", commitInterval: nil),
                                logger: logger)
        try server.mount()
        let done = DispatchSemaphore(value: 0)
        let thread = Thread {
            try? server.run()
            done.signal()
        }
        thread.start()
        defer {
            server.stop()
            done.wait()
        }
        let file = mountpoint + "/" + DeviceFileVolume.fileName
        if check {
            // e2fsck exits 0 (clean) or 1 (fixed): both leave a filesystem resize2fs accepts.
            let result = try E2fsprogs.run("/sbin/e2fsck", ["-fy", file])
            guard result.status == 0 || result.status == 1 else {
                throw ResizeFailure(subject: name, step: "e2fsck -fy", output: result.output)
            }
        }
        let resize = try E2fsprogs.run("/sbin/resize2fs", check ? [file] : ["-f", file])
        guard resize.status == 0 else { throw ResizeFailure(subject: name, step: "resize2fs", output: resize.output) }
    }
}
