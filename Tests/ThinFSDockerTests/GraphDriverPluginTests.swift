import Foundation
import TestSupport
import Testing
import ThinFS
@testable import ThinFSDocker
#if canImport(Glibc)
import Glibc
#endif

/// A store, the daemon that mounts its layers, and the Docker plugin on a unix socket in this
/// process, driven over that socket by curl (an HTTP client that is not ours): what moby's
/// plugin client sends, as POSTs of JSON, and ApplyDiff's tar with chunked encoding as Go's
/// http.Client sends a body of unknown length.
final class PluginHarness: @unchecked Sendable {
    let dir = TempDir()
    let store: LayerStore
    let daemon: LayerDaemon
    let server: DockerPluginServer
    var socket: String { server.socketPath }
    /// Docker's `Home` for the driver (DATA_ROOT/NAME).
    var home: String { dir.path + "/docker/thinfs" }

    init(options extra: [String] = []) throws {
        let options = try StorageOptions(parsing: ["dm.basesize=64M", "dm.loopdatasize=512M", "dm.loopmetadatasize=16M"] + extra)
        store = try LayerStore.initialize(root: dir.path + "/store", options: options, logger: quietLogger)
        daemon = LayerDaemon(store: store, logger: quietLogger)
        server = try DockerPluginServer.start(plugin: GraphDriverPlugin(daemon: daemon, logger: quietLogger),
                                              socketPath: dir.path + "/plugins/thinfs.sock")
    }

    /// Stops the server (which unmounts what is still mounted) and the daemon.
    func shutDown() {
        server.stop()
        daemon.requestStop()
        daemon.waitUntilIdle()
    }

    struct Answer {
        var status: Int
        var body: Data
        var json: [String: Any] { (try? JSONSerialization.jsonObject(with: body)) as? [String: Any] ?? [:] }
        var err: String? { json["Err"] as? String }
    }

    /// POSTs `json` to /`method` and returns the status and the body.
    @discardableResult
    func call(_ method: String, _ json: String? = "{}", uploading file: String? = nil) throws -> Answer {
        let out = dir.path + "/answer-\(UUID().uuidString.prefix(8))"
        defer { unlink(out) }
        var args = ["-sS", "--unix-socket", socket, "-o", out, "-w", "%{http_code}", "-X", "POST",
                    "-H", "Accept: application/vnd.docker.plugins.v1.2+json"]
        if let file {
            args += ["-H", "Transfer-Encoding: chunked", "--data-binary", "@" + file]
        } else if let json {
            args += ["-H", "Content-Type: application/json", "--data-binary", json]
        }
        args.append("http://plugin/" + method)
        let result = try run("/usr/bin/curl", args)
        guard result.status == 0, let code = Int(result.output.trimmingCharacters(in: .whitespacesAndNewlines)) else {
            throw Failure(message: "curl \(method): \(result.output)")
        }
        return Answer(status: code, body: FileManager.default.contents(atPath: out) ?? Data())
    }

    /// `call`, which must succeed (200, no Err).
    @discardableResult
    func ok(_ method: String, _ json: String = "{}", sourceLocation: SourceLocation = #_sourceLocation) throws -> [String: Any] {
        let a = try call(method, json)
        #expect(a.status == 200 && a.err == nil, "\(method) \(json): \(a.status) \(String(decoding: a.body, as: UTF8.self))",
                sourceLocation: sourceLocation)
        return a.json
    }

    func initialize(_ opts: [String] = []) throws {
        let list = opts.map { "\"\($0)\"" }.joined(separator: ",")
        try ok("GraphDriver.Init", #"{"Home":"\#(home)","Opts":[\#(list)],"UIDMaps":null,"GIDMaps":null}"#)
    }
}

struct Failure: Error, CustomStringConvertible {
    var message: String
    var description: String { message }
}

/// Runs a program to completion; its stdout and stderr together.
func run(_ path: String, _ args: [String], in directory: String? = nil) throws -> (status: Int32, output: String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: path)
    p.arguments = args
    if let directory { p.currentDirectoryURL = URL(fileURLWithPath: directory) }
    let pipe = Pipe()
    p.standardOutput = pipe
    p.standardError = pipe
    try p.run()
    let data = pipe.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: data, as: UTF8.self))
}

let hasCurl = FileManager.default.isExecutableFile(atPath: "/usr/bin/curl")

@Suite("Docker graphdriver plugin over its socket", .serialized,
       .enabled(if: Host.canMountFUSE && hasCurl, "needs root and /dev/fuse (Get mounts layers) and curl (the client)"))
struct GraphDriverPluginTests {
    /// Activate names the GraphDriver interface; Init takes dm.* options verbatim and fails on
    /// an unknown key naming it, and on one that would change the store; Capabilities; Status
    /// has devicemapper's pairs; an unknown method is a 404 (moby's client reads that as
    /// "not implemented").
    @Test func activateInitCapabilitiesStatus() throws {
        let h = try PluginHarness()
        defer { h.shutDown() }
        let activate = try h.call("Plugin.Activate", nil)
        #expect(activate.status == 200)
        #expect(activate.json["Implements"] as? [String] == ["GraphDriver"])

        try h.initialize(["dm.basesize=64M", "dm.use_deferred_deletion=false", "dm.fs=ext4"])
        #expect(FileManager.default.fileExists(atPath: h.home + "/mnt"))

        let unknown = try h.call("GraphDriver.Init", #"{"Home":"\#(h.home)","Opts":["dm.basesize=64M","dm.bogus=1"]}"#)
        #expect(unknown.status == 500)
        #expect(unknown.err?.contains("dm.bogus") == true, "\(unknown.err ?? "")")
        // dm.basesize only grows (`baseSizeGrowsOnly`); another option may not change at all.
        let changed = try h.call("GraphDriver.Init", #"{"Home":"\#(h.home)","Opts":["dm.basesize=32M"]}"#)
        #expect(changed.err?.contains("dm.basesize") == true, "\(changed.err ?? "")")
        let blocks = try h.call("GraphDriver.Init", #"{"Home":"\#(h.home)","Opts":["dm.blocksize=128K"]}"#)
        #expect(blocks.err?.contains("dm.blocksize") == true, "\(blocks.err ?? "")")
        let relative = try h.call("GraphDriver.Init", #"{"Home":"relative/home","Opts":null}"#)
        #expect(relative.err?.contains("relative/home") == true)

        let caps = try h.ok("GraphDriver.Capabilities")
        #expect((caps["Capabilities"] as? [String: Any])?["ReproducesExactDiffs"] as? Bool == false)

        let status = try #require(try h.ok("GraphDriver.Status")["Status"] as? [[String]])
        #expect(status.allSatisfy { $0.count == 2 })
        let pairs = Dictionary(status.map { ($0[0], $0[1]) }, uniquingKeysWith: { a, _ in a })
        for key in ["Pool Name", "Pool Blocksize", "Base Device Size", "Backing Filesystem", "Data file", "Metadata file",
                    "Data Space Used", "Data Space Total", "Data Space Available", "Metadata Space Used",
                    "Metadata Space Total", "Metadata Space Available", "Thin Pool Minimum Free Space",
                    "Udev Sync Supported", "Deferred Removal Enabled", "Deferred Deletion Enabled",
                    "Deferred Deleted Device Count", "Library Version"] {
            #expect(pairs[key] != nil, "Status lacks \(key): \(status)")
        }
        #expect(pairs["Base Device Size"] == ByteSize.human(64 << 20))
        #expect(pairs["Backing Filesystem"] == "extfs")

        let missing = try h.call("GraphDriver.NoSuchThing")
        #expect(missing.status == 404)
        #expect(missing.err?.contains("GraphDriver.NoSuchThing") == true)
    }

    /// Create, Exists, Get (a FUSE mount under Home, counted), Put (the last one unmounts),
    /// a child that sees its parent's file, Remove (refused with a child), GetMetadata.
    @Test func createGetPutExistsRemove() throws {
        let h = try PluginHarness()
        defer { h.shutDown() }
        try h.initialize()
        #expect(try h.ok("GraphDriver.Exists", #"{"ID":"base"}"#)["Exists"] as? Bool == false)
        try h.ok("GraphDriver.Create", #"{"ID":"base"}"#)
        #expect(try h.ok("GraphDriver.Exists", #"{"ID":"base"}"#)["Exists"] as? Bool == true)
        #expect(try h.call("GraphDriver.Create", #"{"ID":"base"}"#).err?.contains("base") == true)

        let dir = try #require(try h.ok("GraphDriver.Get", #"{"ID":"base","MountLabel":""}"#)["Dir"] as? String)
        #expect(dir == URL(fileURLWithPath: h.home + "/mnt/base").resolvingSymlinksInPath().path)
        #expect(Host.isMounted(dir))
        try "hello\n".write(toFile: dir + "/greeting", atomically: false, encoding: .utf8)
        // A second Get: the same mount; one Put leaves it mounted, the second unmounts.
        #expect(try h.ok("GraphDriver.Get", #"{"ID":"base"}"#)["Dir"] as? String == dir)
        try h.ok("GraphDriver.Put", #"{"ID":"base"}"#)
        #expect(Host.isMounted(dir))
        try h.ok("GraphDriver.Put", #"{"ID":"base"}"#)
        #expect(!Host.isMounted(dir))
        #expect(!FileManager.default.fileExists(atPath: dir))
        let extra = try h.call("GraphDriver.Put", #"{"ID":"base"}"#)
        #expect(extra.status == 500 && extra.err?.contains("base") == true)

        try h.ok("GraphDriver.Create", #"{"ID":"child","Parent":"base"}"#)
        let childDir = try #require(try h.ok("GraphDriver.Get", #"{"ID":"child"}"#)["Dir"] as? String)
        #expect(try String(contentsOfFile: childDir + "/greeting", encoding: .utf8) == "hello\n")
        // The child is writable (it has no child of its own); the parent, frozen now, mounts read-only.
        try "more\n".write(toFile: childDir + "/more", atomically: false, encoding: .utf8)
        let parentDir = try #require(try h.ok("GraphDriver.Get", #"{"ID":"base"}"#)["Dir"] as? String)
        #expect(Host.mountOptions(parentDir)?.contains("ro") == true)
        #expect(!FileManager.default.fileExists(atPath: parentDir + "/more"))
        try h.ok("GraphDriver.Put", #"{"ID":"base"}"#)
        try h.ok("GraphDriver.Put", #"{"ID":"child"}"#)

        let metadata = try #require(try h.ok("GraphDriver.GetMetadata", #"{"ID":"child"}"#)["Metadata"] as? [String: String])
        let child = try #require(try h.store.layer("child"))
        #expect(metadata["DeviceId"] == String(child.deviceID))
        #expect(metadata["DeviceSize"] == String(64 << 20))

        let refused = try h.call("GraphDriver.Remove", #"{"ID":"base"}"#)
        #expect(refused.err?.contains("child") == true, "\(refused.err ?? "")")
        try h.ok("GraphDriver.Remove", #"{"ID":"child"}"#)
        try h.ok("GraphDriver.Remove", #"{"ID":"base"}"#)
        #expect(try h.store.allLayers().isEmpty)
        #expect(try h.ok("GraphDriver.Exists", #"{"ID":"child"}"#)["Exists"] as? Bool == false)
    }

    /// CreateReadWrite with `--storage-opt size=`: a bigger filesystem (statfs in the mount);
    /// smaller than the base device and unknown keys are refused, naming them. A read-write
    /// layer that gets a child (Docker's -init layer) becomes its frozen parent.
    @Test func createReadWriteWithSize() throws {
        let h = try PluginHarness()
        defer { h.shutDown() }
        try h.initialize()
        try h.ok("GraphDriver.CreateReadWrite", #"{"ID":"c1-init","StorageOpt":{"size":"128M"}}"#)
        try h.ok("GraphDriver.CreateReadWrite", #"{"ID":"c1","Parent":"c1-init","StorageOpt":{"size":"128M"}}"#)
        #expect(try h.store.layer("c1-init")?.kind == .image)
        #expect(try h.store.layer("c1")?.kind == .container)
        let dir = try #require(try h.ok("GraphDriver.Get", #"{"ID":"c1"}"#)["Dir"] as? String)
        var fs = statvfs()
        #expect(statvfs(dir, &fs) == 0)
        let total = UInt64(fs.f_blocks) * UInt64(fs.f_frsize)
        #expect(total > 100 << 20 && total <= 128 << 20, "filesystem size \(total)")
        try h.ok("GraphDriver.Put", #"{"ID":"c1"}"#)

        let small = try h.call("GraphDriver.CreateReadWrite", #"{"ID":"c2","StorageOpt":{"size":"16M"}}"#)
        #expect(small.err?.contains("c2") == true, "\(small.err ?? "")")
        let unknown = try h.call("GraphDriver.CreateReadWrite", #"{"ID":"c3","StorageOpt":{"inodes":"5"}}"#)
        #expect(unknown.err?.contains("inodes") == true, "\(unknown.err ?? "")")
        let bad = try h.call("GraphDriver.CreateReadWrite", #"{"ID":"c4","StorageOpt":{"size":"lots"}}"#)
        #expect(bad.err?.contains("lots") == true)
        #expect(try h.store.allLayers().map(\.id).sorted() == ["c1", "c1-init"])
    }

    /// `--storage-opt size=16777215T` (2^64 - 2^40 bytes) parses, but no thin device is that
    /// large: the old code trapped storing it (Int64(size) while growing the filesystem) and took
    /// the daemon down (fuzz-docker-plugin's input, Fuzz/Corpus/docker-plugin/regression-storage-opt-size-2-64).
    @Test func aSizeNoThinDeviceCanHaveIsAnError() throws {
        let h = try PluginHarness()
        defer { h.shutDown() }
        try h.initialize()
        try h.ok("GraphDriver.Create", #"{"ID":"img"}"#)
        let a = try h.call("GraphDriver.CreateReadWrite", #"{"ID":"c9","Parent":"img","StorageOpt":{"size":"16777215T"}}"#)
        #expect(a.status == 500 && a.err?.contains("size of layer c9") == true && a.err?.contains("18446742974197923840") == true,
                "\(a.status) \(a.err ?? "")")
        #expect(try h.store.allLayers().map(\.id) == ["img"])
        try h.ok("GraphDriver.Status")
    }

    /// ApplyDiff of a tar (streamed, chunked), then a child changed through its mount: Changes
    /// and DiffSize say what changed, Diff's tar has it with a whiteout, and GNU tar reads it.
    @Test func applyDiffDiffChangesDiffSize() throws {
        let h = try PluginHarness()
        defer { h.shutDown() }
        try h.initialize()
        let src = h.dir.path + "/src"
        try FileManager.default.createDirectory(atPath: src + "/dir", withIntermediateDirectories: true)
        try String(repeating: "a", count: 1000).write(toFile: src + "/a", atomically: false, encoding: .utf8)
        try String(repeating: "b", count: 300).write(toFile: src + "/dir/b", atomically: false, encoding: .utf8)
        let tar = h.dir.path + "/layer.tar"
        #expect(try run("/bin/tar", ["-cf", tar, "-C", src, "a", "dir"]).status == 0)

        try h.ok("GraphDriver.Create", #"{"ID":"l1"}"#)
        let applied = try h.call("GraphDriver.ApplyDiff?id=l1&parent=", nil, uploading: tar)
        #expect(applied.status == 200, "\(String(decoding: applied.body, as: UTF8.self))")
        #expect(applied.json["Size"] as? Int == 1300)

        try h.ok("GraphDriver.Create", #"{"ID":"l2","Parent":"l1"}"#)
        let dir = try #require(try h.ok("GraphDriver.Get", #"{"ID":"l2"}"#)["Dir"] as? String)
        #expect(try String(contentsOfFile: dir + "/dir/b", encoding: .utf8).count == 300)
        try "new a\n".write(toFile: dir + "/a", atomically: false, encoding: .utf8)
        try "c!\n".write(toFile: dir + "/c", atomically: false, encoding: .utf8)
        try FileManager.default.removeItem(atPath: dir + "/dir/b")
        try h.ok("GraphDriver.Put", #"{"ID":"l2"}"#)

        let changes = try #require(try h.ok("GraphDriver.Changes", #"{"ID":"l2","Parent":"l1"}"#)["Changes"] as? [[String: Any]])
        let kinds = Dictionary(changes.compactMap { c in (c["Path"] as? String).map { ($0, c["Kind"] as? Int ?? -1) } },
                               uniquingKeysWith: { a, _ in a })
        #expect(kinds["/a"] == 0, "\(changes)")       // ChangeModify
        #expect(kinds["/c"] == 1, "\(changes)")       // ChangeAdd
        #expect(kinds["/dir/b"] == 2, "\(changes)")   // ChangeDelete
        #expect(kinds["/dir"] == nil || kinds["/dir"] == 0, "\(changes)")
        #expect(try h.ok("GraphDriver.DiffSize", #"{"ID":"l2","Parent":"l1"}"#)["Size"] as? Int == 6 + 3)

        let diff = try h.call("GraphDriver.Diff", #"{"ID":"l2","Parent":"l1"}"#)
        #expect(diff.status == 200)
        let diffTar = h.dir.path + "/diff.tar"
        try diff.body.write(to: URL(fileURLWithPath: diffTar))
        let listing = try run("/bin/tar", ["-tf", diffTar])
        #expect(listing.status == 0, "\(listing.output)")
        let names = Set(listing.output.split(separator: "\n").map { $0.hasPrefix("./") ? String($0.dropFirst(2)) : String($0) })
        #expect(names.isSuperset(of: ["a", "c", "dir/.wh.b"]), "\(names)")

        // The same tar applied to a fresh layer over l1 gives l2's content.
        try h.ok("GraphDriver.Create", #"{"ID":"l3","Parent":"l1"}"#)
        #expect(try h.call("GraphDriver.ApplyDiff?id=l3&parent=l1", nil, uploading: diffTar).status == 200)
        let l3 = try #require(try h.ok("GraphDriver.Get", #"{"ID":"l3"}"#)["Dir"] as? String)
        #expect(try String(contentsOfFile: l3 + "/a", encoding: .utf8) == "new a\n")
        #expect(!FileManager.default.fileExists(atPath: l3 + "/dir/b"))
        try h.ok("GraphDriver.Put", #"{"ID":"l3"}"#)

        // Docker's parent must be the stored one; a failed Diff is an error status, not a tar.
        let wrong = try h.call("GraphDriver.Diff", #"{"ID":"l2","Parent":"l3"}"#)
        #expect(wrong.status == 500 && wrong.err?.contains("l3") == true)
        // No parent: against nothing (moby's naive diff with an empty parent), l2's whole content.
        let whole = try #require(try h.ok("GraphDriver.Changes", #"{"ID":"l2"}"#)["Changes"] as? [[String: Any]])
        let all = Dictionary(whole.compactMap { c in (c["Path"] as? String).map { ($0, c["Kind"] as? Int ?? -1) } },
                             uniquingKeysWith: { a, _ in a })
        #expect(all == ["/a": 1, "/c": 1, "/dir": 1], "\(whole)")
        #expect(try h.ok("GraphDriver.DiffSize", #"{"ID":"l2"}"#)["Size"] as? Int == 6 + 3)
    }

    /// Remove of a layer dockerd has mounted (Get without Put): refused, naming the holder and
    /// the option, without dm.use_deferred_deletion; with it, the layer is gone for Docker at
    /// once and deleted from the pool when the last Put unmounts it.
    @Test(arguments: [false, true]) func removeOfAMountedLayer(deferred: Bool) throws {
        let h = try PluginHarness(options: ["dm.use_deferred_deletion=\(deferred)"])
        defer { h.shutDown() }
        try h.initialize(["dm.use_deferred_deletion=\(deferred)"])
        try h.ok("GraphDriver.CreateReadWrite", #"{"ID":"busy"}"#)
        let dir = try #require(try h.ok("GraphDriver.Get", #"{"ID":"busy"}"#)["Dir"] as? String)
        let removal = try h.call("GraphDriver.Remove", #"{"ID":"busy"}"#)
        if deferred {
            #expect(removal.status == 200, "\(removal.err ?? "")")
            #expect(try h.ok("GraphDriver.Exists", #"{"ID":"busy"}"#)["Exists"] as? Bool == false)
            #expect(try h.store.layer("busy")?.state == .deleted)
            #expect(Host.isMounted(dir))
            try h.ok("GraphDriver.Put", #"{"ID":"busy"}"#)
            #expect(try h.store.layer("busy") == nil)
        } else {
            #expect(removal.status == 500 && removal.err?.contains("dm.use_deferred_deletion") == true, "\(removal.err ?? "")")
            #expect(try h.store.layer("busy")?.state == .active)
            try h.ok("GraphDriver.Put", #"{"ID":"busy"}"#)
            try h.ok("GraphDriver.Remove", #"{"ID":"busy"}"#)
            #expect(try h.store.layer("busy") == nil)
        }
        #expect(!Host.isMounted(dir))
    }

    /// Ids that try to leave the store (`../x`, `/abs`, a NUL) are refused in every request that
    /// takes one, and nothing appears outside it; a second dockerd (another Home) is refused
    /// while the first has layers mounted; Cleanup unmounts what dockerd left mounted.
    @Test func badIdsSecondDockerdAndCleanup() throws {
        let h = try PluginHarness()
        defer { h.shutDown() }
        try h.initialize()
        let before = try FileManager.default.contentsOfDirectory(atPath: h.dir.path).sorted()
        // `\u0000` in the JSON is a NUL in the decoded id: open(2) and SQLite would stop at it.
        for id in ["../x", "/abs", "../../../../tmp/evil", "a/b", "", #"x\u0000y"#, #"..\u0000/x"#] {
            for method in ["GraphDriver.Create", "GraphDriver.CreateReadWrite", "GraphDriver.Get", "GraphDriver.Remove",
                           "GraphDriver.Put", "GraphDriver.GetMetadata", "GraphDriver.Diff", "GraphDriver.Changes"] {
                let a = try h.call(method, #"{"ID":"\#(id)"}"#)
                #expect(a.status == 500 && a.err != nil, "\(method) \(id): \(a.status) \(a.err ?? "")")
            }
            let encoded = id.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? id
            let apply = try h.call("GraphDriver.ApplyDiff?id=\(encoded)", nil, uploading: "/dev/null")
            #expect(apply.status == 500, "ApplyDiff \(id)")
        }
        #expect(try FileManager.default.contentsOfDirectory(atPath: h.dir.path).sorted() == before)
        #expect(!FileManager.default.fileExists(atPath: "/tmp/evil"))
        #expect(try h.store.allLayers().isEmpty)

        // A second dockerd is refused from the first one's Init on, with nothing mounted too
        // (it would mix its layers with the first's), and nothing of it is made.
        let other = h.dir.path + "/other/thinfs"
        let idle = try h.call("GraphDriver.Init", #"{"Home":"\#(other)","Opts":[]}"#)
        #expect(idle.status == 500 && idle.err?.contains("second dockerd") == true && idle.err?.contains(h.home) == true,
                "\(idle.status) \(idle.err ?? "")")
        #expect(!FileManager.default.fileExists(atPath: other))
        try h.ok("GraphDriver.Create", #"{"ID":"one"}"#)
        let dir = try #require(try h.ok("GraphDriver.Get", #"{"ID":"one"}"#)["Dir"] as? String)
        let second = try h.call("GraphDriver.Init", #"{"Home":"\#(other)","Opts":[]}"#)
        #expect(second.err?.contains("second dockerd") == true, "\(second.err ?? "")")
        // The same dockerd again (restarted after a crash, no Cleanup) is the same Home: accepted.
        try h.initialize()
        try h.ok("GraphDriver.Cleanup")
        #expect(!Host.isMounted(dir))
        try h.ok("GraphDriver.Remove", #"{"ID":"one"}"#)
        // The first dockerd's shutdown (Cleanup) lets another one in.
        try h.ok("GraphDriver.Init", #"{"Home":"\#(other)","Opts":[]}"#)
        #expect(FileManager.default.fileExists(atPath: other + "/mnt"))
    }

    /// A bigger dm.basesize at Init grows the base device, as devicemapper's did: a layer made
    /// from the base afterwards has the new size (GetMetadata, and statvfs of its mount), one
    /// made before keeps its own, and Status shows the new Base Device Size. A smaller one is
    /// refused naming both sizes, and changes nothing.
    @Test func baseSizeGrowsOnly() throws {
        let h = try PluginHarness()
        var down = false
        defer { if !down { h.shutDown() } }
        try h.initialize()
        try h.ok("GraphDriver.Create", #"{"ID":"before"}"#)
        try h.initialize(["dm.basesize=160M"])
        try h.ok("GraphDriver.Create", #"{"ID":"after"}"#)
        func deviceSize(_ id: String) throws -> String? {
            (try h.ok("GraphDriver.GetMetadata", #"{"ID":"\#(id)"}"#)["Metadata"] as? [String: Any])?["DeviceSize"] as? String
        }
        #expect(try deviceSize("before") == String(64 << 20))
        #expect(try deviceSize("after") == String(160 << 20))
        let status = try #require(try h.ok("GraphDriver.Status")["Status"] as? [[String]])
        #expect(status.contains(["Base Device Size", ByteSize.human(160 << 20)]), "\(status)")
        for (id, size) in [("before", UInt64(64 << 20)), ("after", UInt64(160 << 20))] {
            let dir = try #require(try h.ok("GraphDriver.Get", #"{"ID":"\#(id)"}"#)["Dir"] as? String)
            var st = statvfs()
            #expect(statvfs(dir, &st) == 0)
            let bytes = UInt64(st.f_blocks) * UInt64(st.f_frsize)
            #expect(bytes > size - size / 8 && bytes <= size, "layer \(id)'s filesystem is \(bytes) bytes, not about \(size)")
            try h.ok("GraphDriver.Put", #"{"ID":"\#(id)"}"#)
        }
        let shrink = try h.call("GraphDriver.Init", #"{"Home":"\#(h.home)","Opts":["dm.basesize=64M"]}"#)
        #expect(shrink.status == 500 && shrink.err?.contains("dm.basesize") == true && shrink.err?.contains("160M") == true
                && shrink.err?.contains("64M") == true, "\(shrink.err ?? "")")
        #expect(h.store.base.size == 160 << 20)
        try h.ok("GraphDriver.Cleanup")
        // The grown base is the store's from now on: it opens with it.
        h.shutDown()
        down = true
        let reopened = try LayerStore.open(root: h.dir.path + "/store", logger: quietLogger)
        defer { try? reopened.close() }
        #expect(reopened.base.size == 160 << 20 && reopened.options.baseSize == 160 << 20)
    }
}
