# The Python extension moequant._C: the only code that sees LibTorch. Included from the top CMakeLists.txt
# when MOEQUANT_BUILD_PYTHON=ON (scikit-build-core sets it). It uses torch's own bundled pybind11 so that
# tensors cross the boundary through torch's type casters, with the pybind11 ABI tags torch was built with.
find_package(Python 3.9 REQUIRED COMPONENTS Interpreter Development.Module)

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
    "import torch, sys; print(torch.utils.cmake_prefix_path); [print(getattr(torch._C, '_PYBIND11_' + k, None) or '-') for k in ('COMPILER_TYPE', 'STDLIB', 'BUILD_ABI')]; print(torch.__version__)"
  OUTPUT_VARIABLE _mq_torch_info
  RESULT_VARIABLE _mq_torch_rc
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _mq_torch_rc EQUAL 0)
  message(FATAL_ERROR "moequant: `import torch` failed in ${Python_EXECUTABLE}. Install torch first and build with "
                      "`pip install --no-build-isolation .` so the build sees it.")
endif()
string(REPLACE "\n" ";" _mq_torch_info "${_mq_torch_info}")
list(GET _mq_torch_info 0 _mq_torch_prefix)
list(GET _mq_torch_info 1 _mq_pb_compiler_type)
list(GET _mq_torch_info 2 _mq_pb_stdlib)
list(GET _mq_torch_info 3 _mq_pb_build_abi)
list(GET _mq_torch_info 4 _mq_torch_version)
list(APPEND CMAKE_PREFIX_PATH "${_mq_torch_prefix}")
# A CUDA build of torch probes the GPUs of the build machine unless told which architectures to use; the build
# machine may have none, and our kernels are not compiled through torch anyway.
if(NOT DEFINED TORCH_CUDA_ARCH_LIST AND NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
  set(TORCH_CUDA_ARCH_LIST "")
  foreach(_arch IN LISTS MOEQUANT_CUDA_ARCHS)
    string(REGEX REPLACE "^([0-9]+)([0-9])[a-z]?$" "\\1.\\2" _dotted "${_arch}")
    list(APPEND TORCH_CUDA_ARCH_LIST "${_dotted}")
  endforeach()
endif()
find_package(Torch REQUIRED)
find_library(MOEQUANT_TORCH_PYTHON_LIBRARY torch_python PATHS "${TORCH_INSTALL_PREFIX}/lib" NO_DEFAULT_PATH REQUIRED)

set(_mq_binding_sources
  ${CMAKE_CURRENT_LIST_DIR}/module.cpp
  ${CMAKE_CURRENT_LIST_DIR}/ops_cpu.cpp
)
if(MOEQUANT_WITH_CUDA)
  list(APPEND _mq_binding_sources ${CMAKE_CURRENT_LIST_DIR}/ops_cuda.cpp)
endif()

Python_add_library(_C MODULE WITH_SOABI ${_mq_binding_sources})
target_link_libraries(_C PRIVATE moequant_core ${TORCH_LIBRARIES} ${MOEQUANT_TORCH_PYTHON_LIBRARY})
target_compile_definitions(_C PRIVATE TORCH_EXTENSION_NAME=_C TORCH_API_INCLUDE_EXTENSION_H)
# Older torch builds publish the pybind11 ABI tags they were built with; newer ones (pybind11 3) do not need them.
foreach(_tag COMPILER_TYPE STDLIB BUILD_ABI)
  string(TOLOWER "${_tag}" _lc)
  set(_val "${_mq_pb_${_lc}}")
  if(NOT _val STREQUAL "-")
    target_compile_definitions(_C PRIVATE PYBIND11_${_tag}="${_val}")
  endif()
endforeach()
if(MOEQUANT_WITH_CUDA)
  target_link_libraries(_C PRIVATE moequant_cuda)
  target_compile_definitions(_C PRIVATE MOEQUANT_WITH_CUDA=1)
endif()
# The extension finds torch's libraries through the already-imported torch module; no rpath into the build tree.
set_target_properties(_C PROPERTIES CXX_VISIBILITY_PRESET hidden)
install(TARGETS _C LIBRARY DESTINATION moequant)
# The torch the extension is compiled against, read by moequant/__init__.py before it imports _C (a different
# torch fails there with a clear ImportError instead of an undefined symbol).
file(CONFIGURE OUTPUT "${CMAKE_CURRENT_BINARY_DIR}/_build_info.py" CONTENT
"\"\"\"Written by bindings/extension.cmake at build time: the torch moequant._C was compiled against.\"\"\"
TORCH_VERSION = \"@_mq_torch_version@\"
" @ONLY)
install(FILES "${CMAKE_CURRENT_BINARY_DIR}/_build_info.py" DESTINATION moequant)
