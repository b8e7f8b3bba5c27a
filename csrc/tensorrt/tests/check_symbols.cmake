# ctest tensorrt_plugin.no_tensorrt_symbols: libadsc_tensorrt.so must load without libnvinfer until
# TensorRT calls it. So `nm -D --undefined-only` names no TensorRT symbol, no DT_NEEDED entry names
# a TensorRT library, and the dynamic symbol table defines getCreators and setLoggerFinder.
#   cmake -DLIB=<lib> -DNM=<nm> -DREADELF=<readelf> -P check_symbols.cmake
foreach(var LIB NM READELF)
  if(NOT ${var})
    message(FATAL_ERROR "check_symbols.cmake: -D${var}=... is required")
  endif()
endforeach()
# TensorRT's C++ API lives in namespace nvinfer1 / nvonnxparser (mangled 8nvinfer1, 12nvonnxparser);
# its C entry points are createInfer*, getInferLib*, getPluginRegistry, initLibNvInferPlugins, ...
set(trt_regex "nvinfer1|nvonnxparser|createInfer|getInferLib|PluginRegistry|initLibNvInfer|createNvOnnx|getNvOnnx|_INTERNAL")

execute_process(COMMAND ${NM} -D --undefined-only ${LIB} OUTPUT_VARIABLE undefined RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "${NM} -D --undefined-only ${LIB} failed (${rc})")
endif()
string(REGEX MATCHALL "[^\n]*(${trt_regex})[^\n]*" bad "${undefined}")
if(bad)
  list(JOIN bad "\n" bad)
  message(FATAL_ERROR "undefined TensorRT symbols in ${LIB}:\n${bad}")
endif()

execute_process(COMMAND ${READELF} -d ${LIB} OUTPUT_VARIABLE dynamic RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "${READELF} -d ${LIB} failed (${rc})")
endif()
string(REGEX MATCHALL "NEEDED[^\n]*\\[[^]]*\\]" needed_lines "${dynamic}")
set(needed "")
foreach(entry IN LISTS needed_lines)
  string(REGEX REPLACE ".*\\[(.*)\\]" "\\1" entry "${entry}")
  list(APPEND needed "${entry}")
endforeach()
foreach(entry IN LISTS needed)
  if(entry MATCHES "nvinfer|nvonnxparser")
    message(FATAL_ERROR "${LIB} needs a TensorRT library: ${entry}")
  endif()
endforeach()

execute_process(COMMAND ${NM} -D --defined-only ${LIB} OUTPUT_VARIABLE defined RESULT_VARIABLE rc)
foreach(sym getCreators setLoggerFinder)
  if(NOT defined MATCHES " T ${sym}\n")
    message(FATAL_ERROR "${LIB} does not export ${sym}:\n${defined}")
  endif()
endforeach()
string(REGEX MATCHALL "\n[0-9a-f]+ [TWDBRV] [^\n]*" exported "\n${defined}")
list(LENGTH exported n_exported)
message(STATUS "${LIB}: no undefined TensorRT symbol, no TensorRT DT_NEEDED, ${n_exported} defined dynamic symbols "
               "(getCreators, setLoggerFinder among them); DT_NEEDED: ${needed}")
