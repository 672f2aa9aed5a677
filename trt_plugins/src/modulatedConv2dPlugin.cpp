/*
 * TensorRT IPluginV3 binding of the StyleGAN2 modulated convolution: field parsing, shapes, formats, workspace and
 * the library entry points (getCreators / setLoggerFinder) that IPluginRegistry::loadLibrary and
 * `trtexec --dynamicPlugins` look up. The arithmetic lives in modulatedConv2dKernels.cu.
 */
#include "modulatedConv2dPlugin.h"

#include <cmath>
#include <cstring>
#include <exception>
#include <iostream>
#include <mutex>
#include <sstream>

using namespace nvinfer1;

namespace stylecast
{
namespace plugin
{
namespace
{

// ---------------------------------------------------------------------------------------------------------------
// Logging: through TensorRT's logger once the registry handed us a finder, else stderr.
// ---------------------------------------------------------------------------------------------------------------

std::mutex gLoggerMutex;
ILoggerFinder* gLoggerFinder{nullptr};
thread_local std::string gLastError;

void logMessage(ILogger::Severity severity, std::string const& message)
{
    std::string const text = std::string("[stylecast::ModulatedConv2d] ") + message;
    if (severity <= ILogger::Severity::kERROR)
    {
        gLastError = message;
    }
    ILogger* logger{nullptr};
    {
        std::lock_guard<std::mutex> lock(gLoggerMutex);
        if (gLoggerFinder != nullptr)
        {
            logger = gLoggerFinder->findLogger();
        }
    }
    if (logger != nullptr)
    {
        logger->log(severity, text.c_str());
    }
    else if (severity <= ILogger::Severity::kWARNING)
    {
        std::cerr << text << std::endl;
    }
}

void logError(std::string const& message)
{
    logMessage(ILogger::Severity::kERROR, message);
}

// ---------------------------------------------------------------------------------------------------------------
// Field parsing
// ---------------------------------------------------------------------------------------------------------------

// IEEE half -> float without CUDA headers (a kFLOAT16 attribute is legal, if unusual).
float halfBitsToFloat(uint16_t bits)
{
    uint32_t const sign = (bits >> 15) & 1U;
    int32_t const exponent = (bits >> 10) & 0x1F;
    uint32_t const mantissa = bits & 0x3FFU;
    float value{0.0F};
    if (exponent == 0)
    {
        value = std::ldexp(static_cast<float>(mantissa), -24);
    }
    else if (exponent == 31)
    {
        value = mantissa != 0 ? std::nanf("") : INFINITY;
    }
    else
    {
        value = std::ldexp(static_cast<float>(mantissa | 0x400U), exponent - 25);
    }
    return sign != 0 ? -value : value;
}

//! Element `index` of a numeric field as double; false for non-numeric types.
bool fieldElement(PluginField const& field, int32_t index, double& value)
{
    switch (field.type)
    {
    case PluginFieldType::kINT8: value = static_cast<int8_t const*>(field.data)[index]; return true;
    case PluginFieldType::kINT16: value = static_cast<int16_t const*>(field.data)[index]; return true;
    case PluginFieldType::kINT32: value = static_cast<int32_t const*>(field.data)[index]; return true;
    case PluginFieldType::kINT64:
        value = static_cast<double>(static_cast<int64_t const*>(field.data)[index]);
        return true;
    case PluginFieldType::kFLOAT16:
        value = halfBitsToFloat(static_cast<uint16_t const*>(field.data)[index]);
        return true;
    case PluginFieldType::kFLOAT32: value = static_cast<float const*>(field.data)[index]; return true;
    case PluginFieldType::kFLOAT64: value = static_cast<double const*>(field.data)[index]; return true;
    default: return false;
    }
}

std::string readScalar(PluginField const& field, double& value)
{
    if (field.length < 1 || field.data == nullptr)
    {
        return std::string("field '") + field.name + "' is empty";
    }
    if (!fieldElement(field, 0, value))
    {
        return std::string("field '") + field.name + "' has a non-numeric type";
    }
    return {};
}

std::string readInt(PluginField const& field, int32_t& out)
{
    double value{0.0};
    std::string err = readScalar(field, value);
    if (err.empty())
    {
        if (value != std::floor(value) || std::fabs(value) > 1e9)
        {
            return std::string("field '") + field.name + "' must be an integer";
        }
        out = static_cast<int32_t>(value);
    }
    return err;
}

std::string readFloat(PluginField const& field, float& out)
{
    double value{0.0};
    std::string err = readScalar(field, value);
    if (err.empty())
    {
        out = static_cast<float>(value);
    }
    return err;
}

std::string readFloatList(PluginField const& field, std::vector<float>& out)
{
    out.clear();
    if (field.length <= 0 || field.data == nullptr)
    {
        return {};
    }
    out.reserve(static_cast<size_t>(field.length));
    for (int32_t i = 0; i < field.length; ++i)
    {
        double value{0.0};
        if (!fieldElement(field, i, value))
        {
            return std::string("field '") + field.name + "' has a non-numeric type";
        }
        out.push_back(static_cast<float>(value));
    }
    return {};
}

std::string describeFields(ModulatedConv2dFields const& f)
{
    std::ostringstream s;
    s << "demodulate=" << f.demodulate << ";up=" << f.up << ";act=" << f.act << ";alpha=" << f.alpha
      << ";gain=" << f.gain << ";clamp=" << f.clamp << ";has_noise=" << f.hasNoise << ";has_bias=" << f.hasBias
      << ";has_skip=" << f.hasSkip << ";filter_size=" << f.filterSize << ";filter=";
    for (float v : f.resampleFilter)
    {
        s << v << ",";
    }
    return s.str();
}

bool isSupportedType(DataType type)
{
    return type == DataType::kFLOAT || type == DataType::kHALF;
}

} // namespace

// ---------------------------------------------------------------------------------------------------------------
// Fields
// ---------------------------------------------------------------------------------------------------------------

ModConvAttributes ModulatedConv2dFields::attributes() const noexcept
{
    ModConvAttributes attrs;
    attrs.demodulate = demodulate != 0;
    attrs.up = up;
    attrs.act = static_cast<Activation>(act);
    attrs.alpha = alpha;
    attrs.gain = gain;
    attrs.clamp = clamp;
    attrs.filterSize = resampleFilter.empty() ? 0 : filterSize;
    for (size_t i = 0; i < resampleFilter.size() && i < static_cast<size_t>(kMAX_FILTER_SIZE * kMAX_FILTER_SIZE); ++i)
    {
        attrs.filter[i] = resampleFilter[i];
    }
    return attrs;
}

std::string parseFields(PluginFieldCollection const* fc, ModulatedConv2dFields& out)
{
    ModulatedConv2dFields f;
    if (fc == nullptr)
    {
        return "no plugin fields given";
    }
    if (fc->nbFields > 0 && fc->fields == nullptr)
    {
        return "plugin field collection has no field array";
    }
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        PluginField const& field = fc->fields[i];
        if (field.name == nullptr)
        {
            return "plugin field without a name";
        }
        std::string const name = field.name;
        std::string err;
        if (name == "demodulate")
        {
            err = readInt(field, f.demodulate);
        }
        else if (name == "up")
        {
            err = readInt(field, f.up);
        }
        else if (name == "act")
        {
            err = readInt(field, f.act);
        }
        else if (name == "alpha")
        {
            err = readFloat(field, f.alpha);
        }
        else if (name == "gain")
        {
            err = readFloat(field, f.gain);
        }
        else if (name == "clamp")
        {
            err = readFloat(field, f.clamp);
        }
        else if (name == "has_noise")
        {
            err = readInt(field, f.hasNoise);
        }
        else if (name == "has_bias")
        {
            err = readInt(field, f.hasBias);
        }
        else if (name == "has_skip")
        {
            err = readInt(field, f.hasSkip);
        }
        else if (name == "filter_size")
        {
            err = readInt(field, f.filterSize);
        }
        else if (name == "resample_filter")
        {
            err = readFloatList(field, f.resampleFilter);
        }
        else
        {
            // Tolerated (e.g. bookkeeping attributes an exporter adds), but visible.
            logMessage(ILogger::Severity::kWARNING, "ignoring unknown plugin field '" + name + "'");
        }
        if (!err.empty())
        {
            return err;
        }
    }
    out = f;
    return {};
}

std::string validateFields(ModulatedConv2dFields const& f)
{
    std::ostringstream err;
    auto isFlag = [](int32_t v) { return v == 0 || v == 1; };
    if (!isFlag(f.demodulate) || !isFlag(f.hasNoise) || !isFlag(f.hasBias) || !isFlag(f.hasSkip))
    {
        err << "demodulate, has_noise, has_bias and has_skip must be 0 or 1";
        return err.str();
    }
    if (f.filterSize < 0 || f.filterSize > kMAX_FILTER_SIZE)
    {
        err << "filter_size must be in [0, " << kMAX_FILTER_SIZE << "], got " << f.filterSize;
        return err.str();
    }
    if (!f.resampleFilter.empty()
        && f.resampleFilter.size() != static_cast<size_t>(f.filterSize) * static_cast<size_t>(f.filterSize))
    {
        err << "resample_filter has " << f.resampleFilter.size() << " values, filter_size " << f.filterSize
            << " needs " << f.filterSize * f.filterSize;
        return err.str();
    }
    if ((f.up == 2 || f.hasSkip != 0) && f.resampleFilter.empty())
    {
        err << "up=2 and has_skip=1 need resample_filter (row-major filter_size x filter_size floats)";
        return err.str();
    }
    for (float v : f.resampleFilter)
    {
        if (!std::isfinite(v))
        {
            return "resample_filter must be finite";
        }
    }
    return validateModConvAttributes(f.attributes());
}

// ---------------------------------------------------------------------------------------------------------------
// Plugin
// ---------------------------------------------------------------------------------------------------------------

ModulatedConv2dPlugin::ModulatedConv2dPlugin(ModulatedConv2dFields fields)
    : mFields(std::move(fields))
    , mAttributes(mFields.attributes())
    , mDescription(describeFields(mFields))
{
    buildFieldsToSerialize();
}

ModulatedConv2dPlugin::ModulatedConv2dPlugin(ModulatedConv2dPlugin const& other)
    : IPluginV3(other)
    , IPluginV3OneCore(other)
    , IPluginV3OneBuild(other)
    , IPluginV3OneRuntime(other)
    , mFields(other.mFields)
    , mAttributes(other.mAttributes)
    , mDescription(other.mDescription)
{
    // The serialisation view points into this object's members, never the source's.
    buildFieldsToSerialize();
}

void ModulatedConv2dPlugin::buildFieldsToSerialize()
{
    mDataToSerialize.clear();
    mDataToSerialize.emplace_back("demodulate", &mFields.demodulate, PluginFieldType::kINT32, 1);
    mDataToSerialize.emplace_back("up", &mFields.up, PluginFieldType::kINT32, 1);
    mDataToSerialize.emplace_back("act", &mFields.act, PluginFieldType::kINT32, 1);
    mDataToSerialize.emplace_back("alpha", &mFields.alpha, PluginFieldType::kFLOAT32, 1);
    mDataToSerialize.emplace_back("gain", &mFields.gain, PluginFieldType::kFLOAT32, 1);
    mDataToSerialize.emplace_back("clamp", &mFields.clamp, PluginFieldType::kFLOAT32, 1);
    mDataToSerialize.emplace_back("has_noise", &mFields.hasNoise, PluginFieldType::kINT32, 1);
    mDataToSerialize.emplace_back("has_bias", &mFields.hasBias, PluginFieldType::kINT32, 1);
    mDataToSerialize.emplace_back("has_skip", &mFields.hasSkip, PluginFieldType::kINT32, 1);
    mDataToSerialize.emplace_back("filter_size", &mFields.filterSize, PluginFieldType::kINT32, 1);
    if (!mFields.resampleFilter.empty())
    {
        // Omitted (not zero-length) when unused: zero-length fields are not portable through every serializer.
        mDataToSerialize.emplace_back("resample_filter", mFields.resampleFilter.data(), PluginFieldType::kFLOAT32,
            static_cast<int32_t>(mFields.resampleFilter.size()));
    }
    mFCToSerialize.nbFields = static_cast<int32_t>(mDataToSerialize.size());
    mFCToSerialize.fields = mDataToSerialize.data();
}

IPluginCapability* ModulatedConv2dPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* ModulatedConv2dPlugin::clone() noexcept
{
    try
    {
        return new ModulatedConv2dPlugin(*this);
    }
    catch (std::exception const& e)
    {
        logError(std::string("clone failed: ") + e.what());
    }
    return nullptr;
}

char const* ModulatedConv2dPlugin::getPluginName() const noexcept
{
    return kPLUGIN_NAME;
}

char const* ModulatedConv2dPlugin::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* ModulatedConv2dPlugin::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

ModConvShape ModulatedConv2dPlugin::shapeFromDims(Dims const* dims) const noexcept
{
    ModConvShape s;
    s.batch = static_cast<int32_t>(dims[0].d[0]);
    s.inChannels = static_cast<int32_t>(dims[0].d[1]);
    s.height = static_cast<int32_t>(dims[0].d[2]);
    s.width = static_cast<int32_t>(dims[0].d[3]);
    s.outChannels = static_cast<int32_t>(dims[1].d[0]);
    s.kernelSize = static_cast<int32_t>(dims[1].d[2]);
    int32_t next = 3;
    s.noiseBatch = 0;
    if (mFields.hasNoise != 0)
    {
        s.noiseBatch = static_cast<int32_t>(dims[next].d[0]);
        ++next;
    }
    s.hasBias = mFields.hasBias != 0;
    s.hasSkip = mFields.hasSkip != 0;
    return s;
}

std::string ModulatedConv2dPlugin::checkDims(Dims const* dims, int32_t nbInputs, int32_t nbOutputs) const
{
    std::ostringstream err;
    if (nbInputs != mFields.nbInputs())
    {
        err << "expected " << mFields.nbInputs() << " inputs (x, weight, styles" << (mFields.hasNoise ? ", noise" : "")
            << (mFields.hasBias ? ", bias" : "") << (mFields.hasSkip ? ", skip" : "") << "), got " << nbInputs;
        return err.str();
    }
    if (nbOutputs != 1)
    {
        err << "expected 1 output, got " << nbOutputs;
        return err.str();
    }
    // Known extents must agree; -1 (dynamic) matches anything.
    auto same = [](int64_t a, int64_t b) { return a < 0 || b < 0 || a == b; };
    auto times = [](int64_t a, int64_t factor) { return a < 0 ? a : a * factor; };
    Dims const& x = dims[0];
    Dims const& weight = dims[1];
    Dims const& styles = dims[2];
    if (x.nbDims != 4 || weight.nbDims != 4 || styles.nbDims != 2)
    {
        err << "x must be 4D, weight 4D and styles 2D; got ranks " << x.nbDims << ", " << weight.nbDims << ", "
            << styles.nbDims;
        return err.str();
    }
    if (!same(weight.d[1], x.d[1]) || !same(styles.d[1], x.d[1]) || !same(styles.d[0], x.d[0])
        || !same(weight.d[2], weight.d[3]))
    {
        err << "shapes disagree: x [N, I, H, W], weight [O, I, k, k], styles [N, I]";
        return err.str();
    }
    int64_t const outH = times(x.d[2], mFields.up);
    int64_t const outW = times(x.d[3], mFields.up);
    int32_t next = 3;
    if (mFields.hasNoise != 0)
    {
        Dims const& noise = dims[next++];
        if (noise.nbDims != 4 || !same(noise.d[1], 1) || !same(noise.d[2], outH) || !same(noise.d[3], outW)
            || !(noise.d[0] < 0 || x.d[0] < 0 || noise.d[0] == 1 || noise.d[0] == x.d[0]))
        {
            err << "noise must be [1 or N, 1, H*up, W*up]";
            return err.str();
        }
    }
    if (mFields.hasBias != 0)
    {
        Dims const& bias = dims[next++];
        if (bias.nbDims != 1 || !same(bias.d[0], weight.d[0]))
        {
            err << "bias must be [O]";
            return err.str();
        }
    }
    if (mFields.hasSkip != 0)
    {
        Dims const& skip = dims[next++];
        if (skip.nbDims != 4 || !same(skip.d[0], x.d[0]) || !same(skip.d[1], weight.d[0])
            || !same(times(skip.d[2], 2), outH) || !same(times(skip.d[3], 2), outW))
        {
            err << "skip must be [N, O, H*up/2, W*up/2]";
            return err.str();
        }
    }
    return {};
}

int32_t ModulatedConv2dPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    try
    {
        if (in == nullptr || out == nullptr || nbInputs != mFields.nbInputs())
        {
            logError("configurePlugin: expected " + std::to_string(mFields.nbInputs()) + " inputs, got "
                + std::to_string(nbInputs));
            return -1;
        }
        std::vector<Dims> dims(static_cast<size_t>(nbInputs));
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            dims[i] = in[i].desc.dims;
        }
        std::string const err = checkDims(dims.data(), nbInputs, nbOutputs);
        if (!err.empty())
        {
            logError("configurePlugin: " + err);
            return -1;
        }
        return 0;
    }
    catch (std::exception const& e)
    {
        logError(std::string("configurePlugin: ") + e.what());
    }
    return -1;
}

int32_t ModulatedConv2dPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (outputTypes == nullptr || inputTypes == nullptr || nbOutputs != 1 || nbInputs < 1)
    {
        logError("getOutputDataTypes: expected 1 output and at least one input");
        return -1;
    }
    outputTypes[0] = inputTypes[0];
    return 0;
}

int32_t ModulatedConv2dPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
    IExprBuilder& exprBuilder) noexcept
{
    if (inputs == nullptr || outputs == nullptr || nbInputs != mFields.nbInputs() || nbOutputs != 1)
    {
        logError("getOutputShapes: expected " + std::to_string(mFields.nbInputs()) + " inputs and 1 output, got "
            + std::to_string(nbInputs) + " and " + std::to_string(nbOutputs));
        return -1;
    }
    if (inputs[0].nbDims != 4 || inputs[1].nbDims != 4)
    {
        logError("getOutputShapes: x and weight must be 4D");
        return -1;
    }
    // [N, O, H * up, W * up]: the batch stays symbolic, so one engine serves every batch size of its profile.
    DimsExprs& out = outputs[0];
    out.nbDims = 4;
    out.d[0] = inputs[0].d[0];
    out.d[1] = inputs[1].d[0];
    if (mFields.up == 1)
    {
        out.d[2] = inputs[0].d[2];
        out.d[3] = inputs[0].d[3];
    }
    else
    {
        IDimensionExpr const* factor = exprBuilder.constant(mFields.up);
        out.d[2] = exprBuilder.operation(DimensionOperation::kPROD, *inputs[0].d[2], *factor);
        out.d[3] = exprBuilder.operation(DimensionOperation::kPROD, *inputs[0].d[3], *factor);
    }
    return 0;
}

bool ModulatedConv2dPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (inOut == nullptr || pos < 0 || pos >= nbInputs + nbOutputs)
    {
        return false;
    }
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR || !isSupportedType(desc.type))
    {
        return false;
    }
    // One type for every tensor (decided by x): the kernels are instantiated per I/O type, never mixed.
    return pos == 0 || desc.type == inOut[0].desc.type;
}

int32_t ModulatedConv2dPlugin::getNbOutputs() const noexcept
{
    return 1;
}

size_t ModulatedConv2dPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    if (inputs == nullptr || nbInputs != mFields.nbInputs())
    {
        return 0;
    }
    // Sized for the profile's largest shapes; the layout only shrinks for smaller ones.
    std::vector<Dims> dims(static_cast<size_t>(nbInputs));
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        dims[i] = inputs[i].max;
    }
    ModConvShape const shape = shapeFromDims(dims.data());
    if (shape.batch < 0 || shape.inChannels < 0 || shape.outChannels < 0 || shape.height < 0 || shape.width < 0
        || shape.kernelSize < 0)
    {
        return 0;
    }
    return modConvWorkspaceSize(shape, mAttributes);
}

char const* ModulatedConv2dPlugin::getTimingCacheID() noexcept
{
    return mDescription.c_str();
}

char const* ModulatedConv2dPlugin::getMetadataString() noexcept
{
    return mDescription.c_str();
}

int32_t ModulatedConv2dPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    try
    {
        if (in == nullptr || out == nullptr || nbInputs != mFields.nbInputs())
        {
            logError("onShapeChange: wrong number of inputs");
            return -1;
        }
        std::vector<Dims> dims(static_cast<size_t>(nbInputs));
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            dims[i] = in[i].dims;
        }
        std::string err = checkDims(dims.data(), nbInputs, nbOutputs);
        if (err.empty())
        {
            err = validateModConv(shapeFromDims(dims.data()), mAttributes);
        }
        if (!err.empty())
        {
            logError("onShapeChange: " + err);
            return -1;
        }
        return 0;
    }
    catch (std::exception const& e)
    {
        logError(std::string("onShapeChange: ") + e.what());
    }
    return -1;
}

int32_t ModulatedConv2dPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    if (inputDesc == nullptr || inputs == nullptr || outputs == nullptr)
    {
        return -1;
    }
    Dims dims[6];
    int32_t const nbInputs = mFields.nbInputs();
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        dims[i] = inputDesc[i].dims;
    }
    ModConvShape const shape = shapeFromDims(dims);
    ModConvTensors tensors;
    tensors.x = inputs[0];
    tensors.weight = inputs[1];
    tensors.styles = inputs[2];
    int32_t next = 3;
    tensors.noise = mFields.hasNoise != 0 ? inputs[next++] : nullptr;
    tensors.bias = mFields.hasBias != 0 ? inputs[next++] : nullptr;
    tensors.skip = mFields.hasSkip != 0 ? inputs[next++] : nullptr;
    tensors.out = outputs[0];
    DataKind const kind = inputDesc[0].type == DataType::kHALF ? DataKind::kHALF : DataKind::kFLOAT;
    int32_t const status = enqueueModulatedConv2d(
        kind, shape, mAttributes, tensors, workspace, reinterpret_cast<StreamHandle>(stream));
    if (status != 0)
    {
        logError("enqueue failed with status " + std::to_string(status));
    }
    return status;
}

IPluginV3* ModulatedConv2dPlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    // No per-context resources: the workspace comes from TensorRT on every enqueue.
    return clone();
}

PluginFieldCollection const* ModulatedConv2dPlugin::getFieldsToSerialize() noexcept
{
    return &mFCToSerialize;
}

// ---------------------------------------------------------------------------------------------------------------
// Creator
// ---------------------------------------------------------------------------------------------------------------

ModulatedConv2dPluginCreator::ModulatedConv2dPluginCreator()
{
    mFieldNames.emplace_back("demodulate", nullptr, PluginFieldType::kINT32, 1);
    mFieldNames.emplace_back("up", nullptr, PluginFieldType::kINT32, 1);
    mFieldNames.emplace_back("act", nullptr, PluginFieldType::kINT32, 1);
    mFieldNames.emplace_back("alpha", nullptr, PluginFieldType::kFLOAT32, 1);
    mFieldNames.emplace_back("gain", nullptr, PluginFieldType::kFLOAT32, 1);
    mFieldNames.emplace_back("clamp", nullptr, PluginFieldType::kFLOAT32, 1);
    mFieldNames.emplace_back("has_noise", nullptr, PluginFieldType::kINT32, 1);
    mFieldNames.emplace_back("has_bias", nullptr, PluginFieldType::kINT32, 1);
    mFieldNames.emplace_back("has_skip", nullptr, PluginFieldType::kINT32, 1);
    mFieldNames.emplace_back("resample_filter", nullptr, PluginFieldType::kFLOAT32, 0);
    mFieldNames.emplace_back("filter_size", nullptr, PluginFieldType::kINT32, 1);
    mFC.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFC.fields = mFieldNames.data();
}

char const* ModulatedConv2dPluginCreator::getPluginName() const noexcept
{
    return kPLUGIN_NAME;
}

char const* ModulatedConv2dPluginCreator::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* ModulatedConv2dPluginCreator::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

PluginFieldCollection const* ModulatedConv2dPluginCreator::getFieldNames() noexcept
{
    return &mFC;
}

IPluginV3* ModulatedConv2dPluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    try
    {
        ModulatedConv2dFields fields;
        std::string err = parseFields(fc, fields);
        if (err.empty())
        {
            err = validateFields(fields);
        }
        if (!err.empty())
        {
            logError(std::string("cannot create layer '") + (name != nullptr ? name : "") + "': " + err);
            return nullptr;
        }
        return new ModulatedConv2dPlugin(std::move(fields));
    }
    catch (std::exception const& e)
    {
        logError(std::string("createPlugin: ") + e.what());
    }
    return nullptr;
}

} // namespace plugin
} // namespace stylecast

// ---------------------------------------------------------------------------------------------------------------
// Library entry points (IPluginRegistry::loadLibrary, trtexec --dynamicPlugins, polygraphy --plugins)
// ---------------------------------------------------------------------------------------------------------------

// TensorRT's TENSORRTAPI only exports when building TensorRT itself; the library hides everything else.
#define STYLECAST_EXPORT __attribute__((visibility("default")))

extern "C" STYLECAST_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    std::lock_guard<std::mutex> lock(stylecast::plugin::gLoggerMutex);
    stylecast::plugin::gLoggerFinder = finder;
}

extern "C" STYLECAST_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static stylecast::plugin::ModulatedConv2dPluginCreator sModulatedConv2dCreator;
    static nvinfer1::IPluginCreatorInterface* const kCREATORS[] = {&sModulatedConv2dCreator};
    nbCreators = static_cast<int32_t>(sizeof(kCREATORS) / sizeof(kCREATORS[0]));
    return kCREATORS;
}

//! The last error this thread logged (tests and ctypes users; TensorRT itself gets it through its logger).
extern "C" STYLECAST_EXPORT char const* stylecastPluginLastError()
{
    return stylecast::plugin::gLastError.c_str();
}
