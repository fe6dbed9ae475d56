# The MedAnomaly files an installed extension carries as module resources, so that it needs no
# checkout: the `medanomaly` package source (pyproject.toml, README.md and LICENSE, which the
# package's build reads, and core/medanomaly/) and every bundle folder under monai_bundles/
# (configs, scripts, docs, LICENSE, models/ with the demo weights). Laid out as in a checkout, so
# `pip install <folder>` builds the package and the bundles sit next to it.
#
# Used by MedAnomalyExtension/CMakeLists.txt (install rules) and, in script mode, by the tests:
#   cmake -DMEDANOMALY_ROOT=<checkout> -DMEDANOMALY_FILE_LIST=<out.txt> -P MedAnomalyPackageFiles.cmake
# writes the list, one path relative to the checkout per line.

# What a working checkout holds that is no part of a release: Python caches, training runs and
# checkpoints, editor and OS leftovers.
set(MEDANOMALY_PACKAGE_EXCLUDE_REGEX
  "(^|/)(__pycache__|\\.pytest_cache|\\.ruff_cache|\\.mypy_cache|\\.ipynb_checkpoints|\\.cache|runs|[^/]*\\.egg-info)(/|$)"
  "\\.py[cod]$"
  "(^|/)checkpoint[^/]*\\.pt$"
  "(^|/)(\\.DS_Store|Thumbs\\.db)$"
  "(~|\\.swp|\\.tmp)$"
  )

# medanomaly_package_files(<root> <out_var>): the files to ship, relative to <root>, sorted.
function(medanomaly_package_files root out_var)
  set(_configure_depends CONFIGURE_DEPENDS)  # a new file re-runs the configuration
  if(CMAKE_SCRIPT_MODE_FILE)
    set(_configure_depends)  # not allowed in script mode
  endif()
  file(GLOB_RECURSE _files LIST_DIRECTORIES false ${_configure_depends} RELATIVE "${root}"
    "${root}/core/medanomaly/*"
    "${root}/monai_bundles/*"
    )
  foreach(_regex IN LISTS MEDANOMALY_PACKAGE_EXCLUDE_REGEX)
    list(FILTER _files EXCLUDE REGEX "${_regex}")
  endforeach()
  list(SORT _files)
  foreach(_required pyproject.toml README.md LICENSE core/medanomaly/__init__.py)
    if(NOT EXISTS "${root}/${_required}")
      message(FATAL_ERROR "MedAnomaly: ${root}/${_required} is missing; the extension cannot ship the package.")
    endif()
  endforeach()
  set(${out_var} pyproject.toml README.md LICENSE ${_files} PARENT_SCOPE)
endfunction()

if(CMAKE_SCRIPT_MODE_FILE AND CMAKE_SCRIPT_MODE_FILE STREQUAL CMAKE_CURRENT_LIST_FILE)
  if(NOT MEDANOMALY_ROOT OR NOT MEDANOMALY_FILE_LIST)
    message(FATAL_ERROR "usage: cmake -DMEDANOMALY_ROOT=<checkout> -DMEDANOMALY_FILE_LIST=<out.txt> -P ${CMAKE_CURRENT_LIST_FILE}")
  endif()
  medanomaly_package_files("${MEDANOMALY_ROOT}" _files)
  string(REPLACE ";" "\n" _text "${_files}")
  file(WRITE "${MEDANOMALY_FILE_LIST}" "${_text}\n")
endif()
