# Run as `cmake -P` by the find_package_consumer test: install moequant from a fresh build of SOURCE_DIR into
# INSTALL_DIR, then configure, build and run the consumer project against the installed package only.
foreach(_v SOURCE_DIR CONSUMER_DIR WORK_DIR INSTALL_DIR GENERATOR)
  if(NOT DEFINED ${_v})
    message(FATAL_ERROR "run_consumer.cmake: ${_v} is not set")
  endif()
endforeach()

set(_gen_args -G "${GENERATOR}")
if(MAKE_PROGRAM)
  list(APPEND _gen_args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()
if(CXX_COMPILER)
  list(APPEND _gen_args "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")
endif()

function(_run what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _err)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "consumer test: ${what} failed (${_rc})\n${_out}\n${_err}")
  endif()
  message(STATUS "consumer test: ${what} ok")
  set(_last_out "${_out}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE "${WORK_DIR}" "${INSTALL_DIR}")
_run("configure moequant" "${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${WORK_DIR}/moequant" ${_gen_args}
     -DCMAKE_BUILD_TYPE=Release -DMOEQUANT_BUILD_TESTS=OFF -DMOEQUANT_CUDA=OFF -DMOEQUANT_BUILD_PYTHON=OFF
     -DMOEQUANT_INSTALL=ON "-DCMAKE_INSTALL_PREFIX=${INSTALL_DIR}")
_run("build moequant" "${CMAKE_COMMAND}" --build "${WORK_DIR}/moequant")
_run("install moequant" "${CMAKE_COMMAND}" --install "${WORK_DIR}/moequant")
_run("configure consumer" "${CMAKE_COMMAND}" -S "${CONSUMER_DIR}" -B "${WORK_DIR}/consumer" ${_gen_args}
     -DCMAKE_BUILD_TYPE=Release "-DCMAKE_PREFIX_PATH=${INSTALL_DIR}" "-Dmoequant_ROOT=${INSTALL_DIR}")
_run("build consumer" "${CMAKE_COMMAND}" --build "${WORK_DIR}/consumer")
_run("run consumer" "${WORK_DIR}/consumer/moequant_consumer")
message(STATUS "${_last_out}")
