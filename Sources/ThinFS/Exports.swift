// ThinFS is what the commands, the containerd and Docker front doors, the fuzz harnesses and
// the tests import: the volume (ThinFSExt4), the FUSE server (ThinFSFUSE) and what both stand
// on (ThinFSCore) come through it, as they did when all four were one module. The C modules
// stay behind their doors: ThinFSExt4 and ThinFSFUSE import them `internal`.
@_exported import ThinFSCore
@_exported import ThinFSExt4
@_exported import ThinFSFUSE
