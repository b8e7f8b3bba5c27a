# The installed torch, as the extension adsc_ext._C needs it.
#
# A CPU-ops build asks torch itself (Python) for its version, CUDA version, include and library
# directories and C++ ABI, and links libtorch, libtorch_cpu and libc10 through the imported target
# adsc_torch_cpu: it never runs torch's own CMake config, whose CUDA discovery demands a complete
# CUDA toolkit whenever torch is a CUDA build (even for CPU-only code). find_package(Torch) is used
# only when the CUDA ops are built, after adsc_torch_cuda_blocker has found what that needs.

# Sets ADSC_TORCH_VERSION, ADSC_TORCH_CUDA_VERSION ("" for a CPU torch), ADSC_TORCH_CXX11_ABI,
# ADSC_TORCH_INCLUDE_DIRS, ADSC_TORCH_LIBRARY_DIR, ADSC_TORCH_CMAKE_PREFIX.
function(adsc_probe_torch python)
  set(probe [=[
import torch, torch.utils.cpp_extension as ext
print(torch.__version__)
print(torch.version.cuda or "")
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print("|".join(ext.include_paths()))
print("|".join(ext.library_paths()))
print(torch.utils.cmake_prefix_path)
]=])
  execute_process(COMMAND "${python}" -c "${probe}"
                  OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc
                  OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT rc EQUAL 0)
    string(STRIP "${err}" err)
    string(REGEX REPLACE ".*\n" "" err "${err}")  # the exception line
    message(FATAL_ERROR "adsc: the torch extension needs torch importable by ${python} "
                        "(install torch first, then build with --no-build-isolation): ${err}")
  endif()
  string(REPLACE "\n" ";" lines "${out}")
  list(LENGTH lines n)
  if(NOT n EQUAL 6)
    message(FATAL_ERROR "adsc: unexpected answer from ${python} about torch:\n${out}")
  endif()
  list(GET lines 0 version)
  list(GET lines 1 cuda)
  list(GET lines 2 abi)
  list(GET lines 3 includes)
  list(GET lines 4 libdirs)
  list(GET lines 5 prefix)
  string(REPLACE "|" ";" includes "${includes}")
  string(REPLACE "|" ";" libdirs "${libdirs}")
  list(GET libdirs 0 libdir)
  set(ADSC_TORCH_VERSION "${version}" PARENT_SCOPE)
  set(ADSC_TORCH_CUDA_VERSION "${cuda}" PARENT_SCOPE)
  set(ADSC_TORCH_CXX11_ABI "${abi}" PARENT_SCOPE)
  set(ADSC_TORCH_INCLUDE_DIRS "${includes}" PARENT_SCOPE)
  set(ADSC_TORCH_LIBRARY_DIR "${libdir}" PARENT_SCOPE)
  set(ADSC_TORCH_CMAKE_PREFIX "${prefix}" PARENT_SCOPE)
endfunction()

# The imported target adsc_torch_cpu: torch's headers, ABI flag and CPU libraries.
function(adsc_add_torch_cpu_target)
  add_library(adsc_torch_cpu INTERFACE IMPORTED)
  set(libs "")
  foreach(name torch torch_cpu c10)
    set(lib "${ADSC_TORCH_LIBRARY_DIR}/${CMAKE_SHARED_LIBRARY_PREFIX}${name}${CMAKE_SHARED_LIBRARY_SUFFIX}")
    if(NOT EXISTS "${lib}")
      message(FATAL_ERROR "adsc: torch ${ADSC_TORCH_VERSION} has no ${lib}")
    endif()
    list(APPEND libs "${lib}")
  endforeach()
  set_target_properties(adsc_torch_cpu PROPERTIES
    INTERFACE_INCLUDE_DIRECTORIES "${ADSC_TORCH_INCLUDE_DIRS}"
    INTERFACE_LINK_LIBRARIES "${libs}"
    INTERFACE_COMPILE_DEFINITIONS "_GLIBCXX_USE_CXX11_ABI=${ADSC_TORCH_CXX11_ABI}")
endfunction()

# Why the CUDA ops cannot be built here, or "" when they can: torch must be a CUDA build, the core's
# CUDA kernels on (nvcc found), the toolkit of torch's CUDA major version, and complete as far as
# torch's CMake config and ATen's CUDA headers need it.
function(adsc_torch_cuda_blocker out_var)
  if(ADSC_TORCH_CUDA_VERSION STREQUAL "")
    set(${out_var} "torch ${ADSC_TORCH_VERSION} is a CPU build" PARENT_SCOPE)
    return()
  endif()
  if(NOT ADSC_CUDA_ENABLED)
    if(ADSC_WITH_CUDA STREQUAL "OFF")
      set(why "the CUDA kernels are off (ADSC_WITH_CUDA=OFF)")
    else()
      set(why "no CUDA compiler (nvcc) was found")
    endif()
    set(${out_var} "torch ${ADSC_TORCH_VERSION} is a CUDA ${ADSC_TORCH_CUDA_VERSION} build but ${why}" PARENT_SCOPE)
    return()
  endif()
  get_filename_component(root "${CUDAToolkit_BIN_DIR}" DIRECTORY)
  string(REGEX MATCH "^[0-9]+" torch_major "${ADSC_TORCH_CUDA_VERSION}")
  if(NOT torch_major STREQUAL CUDAToolkit_VERSION_MAJOR)
    set(${out_var} "torch ${ADSC_TORCH_VERSION} is built with CUDA ${ADSC_TORCH_CUDA_VERSION} but the toolkit at ${root} is CUDA ${CUDAToolkit_VERSION}" PARENT_SCOPE)
    return()
  endif()
  set(missing "")
  # The libraries torch's Caffe2 config links (public/cuda.cmake), as CUDAToolkit's targets.
  foreach(lib cudart cuda_driver nvrtc cublas cublasLt curand cufft)
    if(NOT TARGET CUDA::${lib})
      string(REPLACE "cuda_driver" "cuda (the driver stub)" lib "${lib}")
      list(APPEND missing "lib${lib}")
    endif()
  endforeach()
  # ATen/cuda/CUDAContext.h (the current-stream API) includes these.
  foreach(header cuda.h cublas_v2.h cublasLt.h cusparse.h cusolverDn.h)
    find_file(ADSC_CUDA_HEADER_${header} ${header} PATHS ${CUDAToolkit_INCLUDE_DIRS} NO_DEFAULT_PATH)
    if(NOT ADSC_CUDA_HEADER_${header})
      list(APPEND missing "${header}")
    endif()
    unset(ADSC_CUDA_HEADER_${header} CACHE)
  endforeach()
  if(missing)
    list(JOIN missing ", " missing)
    set(${out_var} "the CUDA ${CUDAToolkit_VERSION} toolkit at ${root} is partial (no ${missing})" PARENT_SCOPE)
    return()
  endif()
  set(${out_var} "" PARENT_SCOPE)
endfunction()
