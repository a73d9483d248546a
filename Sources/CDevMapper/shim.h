// CDevMapper: only defines and includes. Exactly one Swift file imports this module.
#pragma once
#include <libdevmapper.h>
