import Foundation
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// Growing a container's filesystem (`create-rw --size`), as Docker's `dm.basesize` growth did
/// with resize2fs on the activated device.
///
/// libext2fs offers no resize call: resizing is e2fsprogs' `resize2fs` program. It works on an
/// image file as well as a disk, so the thin device is served to it as one file through the
/// FUSE server (`DeviceFileVolume`), in this process, on a private mount point:
///
///     ROOT/tmp/resize-XXXX/device ──FUSE──▶ DeviceFileVolume ──▶ thin device (new size)
///     e2fsck -fy  ROOT/tmp/resize-XXXX/device      resize2fs insists on a fresh check
///     resize2fs   ROOT/tmp/resize-XXXX/device      grows to the file's size
///
/// The recorded size goes up before the filesystem does: a crash leaves a device larger than its
/// filesystem (harmless), never the other way round.
extension LayerStore {
    struct ResizeFailure: Swift.Error, CustomStringConvertible {
        var layer: String
        var step: String
        var output: String
        var description: String { "layer \(layer): \(step) failed: \(output)" }
    }

    func growFilesystem(of layer: Layer, to size: UInt64) throws {
        try db.execute("UPDATE layers SET size = ? WHERE id = ?", [.integer(Int64(size)), .text(layer.id)])
        let device = try pool.openDevice(layer.deviceID, size: size)
        defer { device.close() }
        let mountpoint = scratchDirectory + "/resize-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: mountpoint, withIntermediateDirectories: true)
        defer { rmdir(mountpoint) }
        let server = FUSEServer(volume: DeviceFileVolume(device: device), mountpoint: mountpoint,
                                options: .init(readOnly: false, allowOther: false, source: "thinfs-resize:\(layer.id)", commitInterval: nil),
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
        // e2fsck exits 0 (clean) or 1 (fixed): both leave a filesystem resize2fs accepts.
        let check = try E2fsprogs.run("/sbin/e2fsck", ["-fy", file])
        guard check.status == 0 || check.status == 1 else {
            throw ResizeFailure(layer: layer.id, step: "e2fsck -fy", output: check.output)
        }
        let resize = try E2fsprogs.run("/sbin/resize2fs", [file])
        guard resize.status == 0 else { throw ResizeFailure(layer: layer.id, step: "resize2fs", output: resize.output) }
        logger.info("grew a layer's filesystem", metadata: ["layer": "\(layer.id)", "size": "\(size)"])
    }
}
