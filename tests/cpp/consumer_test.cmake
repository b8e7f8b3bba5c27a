# Installs the core (component "sdk") into a fresh prefix, then configures, builds and runs
# examples/cpp_service against it through find_package(adsc) alone, as a C++ service would.
# cmake -DBUILD_DIR=... -DSOURCE_DIR=... -DGENERATOR=... [-DCXX_FLAGS=... -DEXE_LINKER_FLAGS=...]
#       -P consumer_test.cmake
# The flags are the parent build's, so a sanitizer build also builds the example instrumented.
set(work "${BUILD_DIR}/consumer")
set(prefix "${work}/install")
file(REMOVE_RECURSE "${work}")

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    string(REPLACE ";" " " cmd "${ARGN}")
    message(FATAL_ERROR "failed (${rc}): ${cmd}")
  endif()
endfunction()

run(${CMAKE_COMMAND} --install "${BUILD_DIR}" --prefix "${prefix}" --component sdk)
run(${CMAKE_COMMAND} -S "${SOURCE_DIR}/examples/cpp_service" -B "${work}/build" -G "${GENERATOR}"
    -DCMAKE_PREFIX_PATH=${prefix} -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF
    "-DCMAKE_CXX_FLAGS=${CXX_FLAGS}" "-DCMAKE_EXE_LINKER_FLAGS=${EXE_LINKER_FLAGS}")
run(${CMAKE_COMMAND} --build "${work}/build")
run(${CMAKE_CTEST_COMMAND} --test-dir "${work}/build" --output-on-failure)
