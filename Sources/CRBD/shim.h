// CRBD: librbd and librados (Ceph RBD). Only includes. Exactly one Swift file imports this module.
// Debian's librbd-dev and librados-dev ship no pkg-config files: the modulemap links them.
#pragma once
#include <rados/librados.h>
#include <rbd/librbd.h>
