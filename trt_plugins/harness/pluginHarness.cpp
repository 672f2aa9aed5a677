/*
 * CPU harness for the ModulatedConv2d TensorRT plugin library: loads it the way IPluginRegistry::loadLibrary does
 * (dlopen + getCreators) and checks everything that needs no GPU: identity, field parsing, serialisation round
 * trip, output shapes with a symbolic batch (through a fake IExprBuilder), formats, workspace, clone.
 * With --enqueue (only for the CPU-emulation build of the library) it also runs enqueue() on host buffers and
 * compares with a float64 textbook implementation written here, independent of the kernels.
 *
 * Built with STYLECAST_HARNESS_GPU (target stylecast_plugin_harness_gpu) the same --enqueue checks run the real
 * library on device buffers, plus larger multi-tile problems; run it under compute-sanitizer for memcheck/racecheck.
 *
 * Usage: stylecast_plugin_harness <path/to/libstylecast_trt_plugins*.so> [--enqueue]
 * Prints "PASS <check>" / "FAIL <check>: <why>" lines and a final "N passed, M failed"; exit code 1 on failure.
 */
#include "NvInferRuntime.h"

#include <cuda_fp16.h>
#include <dlfcn.h>
#if defined(STYLECAST_HARNESS_GPU)
#include <cuda_runtime_api.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

int32_t gPassed = 0;
int32_t gFailed = 0;

void check(bool ok, std::string const& name, std::string const& why = "")
{
    if (ok)
    {
        ++gPassed;
        std::printf("PASS %s\n", name.c_str());
    }
    else
    {
        ++gFailed;
        std::printf("FAIL %s: %s\n", name.c_str(), why.c_str());
    }
    std::fflush(stdout);
}

// ---------------------------------------------------------------------------------------------------------------
// Logger finder: counts the errors the plugin reports through TensorRT's logging path.
// ---------------------------------------------------------------------------------------------------------------

class CapturingLogger : public ILogger
{
public:
    void log(Severity severity, AsciiChar const* msg) noexcept override
    {
        if (severity <= Severity::kERROR)
        {
            ++mErrors;
            mLast = msg;
        }
    }
    int32_t mErrors{0};
    std::string mLast;
};

class LoggerFinder : public ILoggerFinder
{
public:
    ILogger* findLogger() override
    {
        return &mLogger;
    }
    CapturingLogger mLogger;
};

// ---------------------------------------------------------------------------------------------------------------
// Fake IExprBuilder: a tiny symbolic integer expression tree with constant folding.
// ---------------------------------------------------------------------------------------------------------------

class FakeExpr : public IDimensionExpr
{
public:
    using Env = std::map<std::string, int64_t>;

    class Impl : public apiv::VDimensionExpr
    {
    public:
        explicit Impl(FakeExpr const& owner)
            : mOwner(owner)
        {
        }
        bool isConstant() const override
        {
            return mOwner.mConstant;
        }
        int64_t getConstantValue() const override
        {
            return mOwner.mConstant ? mOwner.mValue : std::numeric_limits<int64_t>::min();
        }
        bool isSizeTensor() const override
        {
            return false;
        }

    private:
        FakeExpr const& mOwner;
    };

    FakeExpr(bool constant, int64_t value, std::string text, std::function<int64_t(Env const&)> eval)
        : mImplObject(*this)
        , mConstant(constant)
        , mValue(value)
        , mText(std::move(text))
        , mEval(std::move(eval))
    {
        mImpl = &mImplObject;
    }
    ~FakeExpr() override = default;

    int64_t evaluate(Env const& env) const
    {
        return mEval(env);
    }
    std::string const& text() const
    {
        return mText;
    }

private:
    Impl mImplObject;
    bool mConstant;
    int64_t mValue;
    std::string mText;
    std::function<int64_t(Env const&)> mEval;
};

class FakeExprBuilder : public IExprBuilder
{
public:
    class Impl : public apiv::VExprBuilder
    {
    public:
        explicit Impl(FakeExprBuilder& owner)
            : mOwner(owner)
        {
        }
        IDimensionExpr const* constant(int64_t value) override
        {
            return mOwner.makeConstant(value);
        }
        IDimensionExpr const* operation(
            DimensionOperation op, IDimensionExpr const& first, IDimensionExpr const& second) override
        {
            return mOwner.makeOperation(op, static_cast<FakeExpr const&>(first), static_cast<FakeExpr const&>(second));
        }
        IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override
        {
            return nullptr;
        }

    private:
        FakeExprBuilder& mOwner;
    };

    FakeExprBuilder()
        : mImplObject(*this)
    {
        mImpl = &mImplObject;
    }
    ~FakeExprBuilder() override = default;

    FakeExpr const* makeConstant(int64_t value)
    {
        mExprs.push_back(std::make_unique<FakeExpr>(
            true, value, std::to_string(value), [value](FakeExpr::Env const&) { return value; }));
        return mExprs.back().get();
    }

    FakeExpr const* makeSymbol(std::string const& name)
    {
        mExprs.push_back(std::make_unique<FakeExpr>(
            false, 0, name, [name](FakeExpr::Env const& env) { return env.at(name); }));
        return mExprs.back().get();
    }

    FakeExpr const* makeOperation(DimensionOperation op, FakeExpr const& a, FakeExpr const& b)
    {
        ++mNbOperations;
        auto apply = [op](int64_t x, int64_t y) -> int64_t {
            switch (op)
            {
            case DimensionOperation::kSUM: return x + y;
            case DimensionOperation::kPROD: return x * y;
            case DimensionOperation::kMAX: return std::max(x, y);
            case DimensionOperation::kMIN: return std::min(x, y);
            case DimensionOperation::kSUB: return x - y;
            case DimensionOperation::kEQUAL: return x == y ? 1 : 0;
            case DimensionOperation::kLESS: return x < y ? 1 : 0;
            case DimensionOperation::kFLOOR_DIV: return x / y;
            case DimensionOperation::kCEIL_DIV: return (x + y - 1) / y;
            }
            return 0;
        };
        FakeExpr const* pa = &a;
        FakeExpr const* pb = &b;
        std::string const text
            = "(" + a.text() + " op" + std::to_string(static_cast<int32_t>(op)) + " " + b.text() + ")";
        if (a.isConstant() && b.isConstant())
        {
            int64_t const value = apply(a.getConstantValue(), b.getConstantValue());
            mExprs.push_back(std::make_unique<FakeExpr>(
                true, value, std::to_string(value), [value](FakeExpr::Env const&) { return value; }));
        }
        else
        {
            mExprs.push_back(std::make_unique<FakeExpr>(false, 0, text,
                [apply, pa, pb](FakeExpr::Env const& env) { return apply(pa->evaluate(env), pb->evaluate(env)); }));
        }
        return mExprs.back().get();
    }

    int32_t mNbOperations{0};

private:
    Impl mImplObject;
    std::vector<std::unique_ptr<FakeExpr>> mExprs;
};

// ---------------------------------------------------------------------------------------------------------------
// Field helpers
// ---------------------------------------------------------------------------------------------------------------

//! Owns field storage of mixed types so tests can build PluginFieldCollections freely.
class FieldBuilder
{
public:
    FieldBuilder& addInt(std::string const& name, int32_t value)
    {
        return add(name, &value, sizeof(value), PluginFieldType::kINT32, 1);
    }
    FieldBuilder& addInt64(std::string const& name, int64_t value)
    {
        return add(name, &value, sizeof(value), PluginFieldType::kINT64, 1);
    }
    FieldBuilder& addFloat(std::string const& name, float value)
    {
        return add(name, &value, sizeof(value), PluginFieldType::kFLOAT32, 1);
    }
    FieldBuilder& addDouble(std::string const& name, double value)
    {
        return add(name, &value, sizeof(value), PluginFieldType::kFLOAT64, 1);
    }
    FieldBuilder& addFloats(std::string const& name, std::vector<float> const& values)
    {
        return add(name, values.data(), values.size() * sizeof(float), PluginFieldType::kFLOAT32,
            static_cast<int32_t>(values.size()));
    }
    FieldBuilder& addRaw(std::string const& name, void const* data, size_t bytes, PluginFieldType type, int32_t length)
    {
        return add(name, data, bytes, type, length);
    }
    FieldBuilder& remove(std::string const& name)
    {
        for (size_t i = 0; i < mNames.size(); ++i)
        {
            if (*mNames[i] == name)
            {
                mNames.erase(mNames.begin() + static_cast<std::ptrdiff_t>(i));
                mData.erase(mData.begin() + static_cast<std::ptrdiff_t>(i));
                mTypes.erase(mTypes.begin() + static_cast<std::ptrdiff_t>(i));
                mLengths.erase(mLengths.begin() + static_cast<std::ptrdiff_t>(i));
                break;
            }
        }
        return *this;
    }
    PluginFieldCollection const* collection()
    {
        mFields.clear();
        for (size_t i = 0; i < mNames.size(); ++i)
        {
            mFields.emplace_back(mNames[i]->c_str(), mData[i]->data(), mTypes[i], mLengths[i]);
        }
        mFC.nbFields = static_cast<int32_t>(mFields.size());
        mFC.fields = mFields.data();
        return &mFC;
    }

private:
    FieldBuilder& add(std::string const& name, void const* data, size_t bytes, PluginFieldType type, int32_t length)
    {
        remove(name);
        mNames.push_back(std::make_unique<std::string>(name));
        auto const* bytesPtr = static_cast<uint8_t const*>(data);
        mData.push_back(std::make_unique<std::vector<uint8_t>>(bytesPtr, bytesPtr + bytes));
        mTypes.push_back(type);
        mLengths.push_back(length);
        return *this;
    }

    std::vector<std::unique_ptr<std::string>> mNames;
    std::vector<std::unique_ptr<std::vector<uint8_t>>> mData;
    std::vector<PluginFieldType> mTypes;
    std::vector<int32_t> mLengths;
    std::vector<PluginField> mFields;
    PluginFieldCollection mFC{};
};

std::vector<float> blurFilter()
{
    float const taps[4] = {1.0F, 3.0F, 3.0F, 1.0F};
    std::vector<float> f(16);
    for (int32_t a = 0; a < 4; ++a)
    {
        for (int32_t b = 0; b < 4; ++b)
        {
            f[a * 4 + b] = taps[a] * taps[b] / 64.0F;
        }
    }
    return f;
}

struct LayerConfig
{
    int32_t demodulate{1};
    int32_t up{1};
    int32_t act{1};
    float alpha{0.2F};
    float gain{1.41421356F};
    float clamp{-1.0F};
    int32_t hasNoise{1};
    int32_t hasBias{1};
    int32_t hasSkip{0};
    std::vector<float> filter;
};

FieldBuilder fieldsFor(LayerConfig const& c)
{
    FieldBuilder fb;
    fb.addInt("demodulate", c.demodulate)
        .addInt("up", c.up)
        .addInt("act", c.act)
        .addFloat("alpha", c.alpha)
        .addFloat("gain", c.gain)
        .addFloat("clamp", c.clamp)
        .addInt("has_noise", c.hasNoise)
        .addInt("has_bias", c.hasBias)
        .addInt("has_skip", c.hasSkip)
        .addInt("filter_size", c.filter.empty() ? 0 : static_cast<int32_t>(std::lround(std::sqrt(c.filter.size()))));
    if (!c.filter.empty())
    {
        fb.addFloats("resample_filter", c.filter);
    }
    return fb;
}

//! Plain-value snapshot of a field collection, for comparisons.
std::map<std::string, std::vector<double>> snapshot(PluginFieldCollection const* fc)
{
    std::map<std::string, std::vector<double>> out;
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        PluginField const& f = fc->fields[i];
        std::vector<double> values;
        for (int32_t j = 0; j < f.length; ++j)
        {
            switch (f.type)
            {
            case PluginFieldType::kINT32: values.push_back(static_cast<int32_t const*>(f.data)[j]); break;
            case PluginFieldType::kFLOAT32: values.push_back(static_cast<float const*>(f.data)[j]); break;
            default: values.push_back(std::nan(""));
            }
        }
        out[f.name] = values;
    }
    return out;
}

std::string describe(std::map<std::string, std::vector<double>> const& s)
{
    std::ostringstream o;
    for (auto const& kv : s)
    {
        o << kv.first << "=[";
        for (double v : kv.second)
        {
            o << v << " ";
        }
        o << "] ";
    }
    return o.str();
}

IPluginV3OneCore* core(IPluginV3* p)
{
    return static_cast<IPluginV3OneCore*>(p->getCapabilityInterface(PluginCapabilityType::kCORE));
}
IPluginV3OneBuild* build(IPluginV3* p)
{
    return static_cast<IPluginV3OneBuild*>(p->getCapabilityInterface(PluginCapabilityType::kBUILD));
}
IPluginV3OneRuntime* runtime(IPluginV3* p)
{
    return static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
}

Dims dims(std::vector<int64_t> const& v)
{
    Dims d{};
    d.nbDims = static_cast<int32_t>(v.size());
    for (size_t i = 0; i < v.size(); ++i)
    {
        d.d[i] = v[i];
    }
    return d;
}

DynamicPluginTensorDesc dyn(std::vector<int64_t> const& v, DataType type = DataType::kFLOAT,
    TensorFormat format = TensorFormat::kLINEAR, std::vector<int64_t> const& maxDims = {})
{
    DynamicPluginTensorDesc d{};
    d.desc.dims = dims(v);
    d.desc.type = type;
    d.desc.format = format;
    d.desc.scale = -1.0F;
    d.min = dims(v);
    d.opt = dims(v);
    d.max = dims(maxDims.empty() ? v : maxDims);
    return d;
}

size_t alignUp(size_t bytes)
{
    return (bytes + 255) / 256 * 256;
}

// ---------------------------------------------------------------------------------------------------------------
// Float64 textbook reference (per-sample kernels, explicit zero insertion and FIR), independent of the kernels.
// ---------------------------------------------------------------------------------------------------------------

struct Problem
{
    int32_t n, i, o, h, w, k;
    LayerConfig cfg;
    int32_t noiseBatch;
    std::vector<double> x, weight, styles, noise, bias, skip;
};

std::vector<double> upfirdnReference(std::vector<double> const& img, int32_t h, int32_t w, int32_t pad0, int32_t outH,
    int32_t outW, std::vector<float> const& f, int32_t fs)
{
    // out[y, x] = 4 * sum_{a,b} f[fs-1-a, fs-1-b] * img[y + a - pad0, x + b - pad0] (true convolution, gain 4).
    std::vector<double> out(static_cast<size_t>(outH) * outW, 0.0);
    for (int32_t y = 0; y < outH; ++y)
    {
        for (int32_t xx = 0; xx < outW; ++xx)
        {
            double acc = 0.0;
            for (int32_t a = 0; a < fs; ++a)
            {
                for (int32_t b = 0; b < fs; ++b)
                {
                    int32_t const sy = y + a - pad0;
                    int32_t const sx = xx + b - pad0;
                    if (sy >= 0 && sy < h && sx >= 0 && sx < w)
                    {
                        acc += 4.0 * f[(fs - 1 - a) * fs + (fs - 1 - b)] * img[static_cast<size_t>(sy) * w + sx];
                    }
                }
            }
            out[static_cast<size_t>(y) * outW + xx] = acc;
        }
    }
    return out;
}

int32_t pyFloorDiv(int32_t a, int32_t b)
{
    return static_cast<int32_t>(std::floor(static_cast<double>(a) / b));
}

std::vector<double> referenceForward(Problem const& p)
{
    LayerConfig const& c = p.cfg;
    int32_t const fs = static_cast<int32_t>(std::lround(std::sqrt(c.filter.size())));
    int32_t const outH = p.h * c.up;
    int32_t const outW = p.w * c.up;
    std::vector<double> out(static_cast<size_t>(p.n) * p.o * outH * outW, 0.0);
    int32_t const kk = p.k * p.k;
    for (int32_t n = 0; n < p.n; ++n)
    {
        for (int32_t o = 0; o < p.o; ++o)
        {
            // Per-sample kernel weight[o, i] * styles[n, i], demodulated over (i, kh, kw).
            std::vector<double> wk(static_cast<size_t>(p.i) * kk);
            double sumSq = 0.0;
            for (int32_t i = 0; i < p.i; ++i)
            {
                for (int32_t t = 0; t < kk; ++t)
                {
                    double const v = p.weight[(static_cast<size_t>(o) * p.i + i) * kk + t] * p.styles[n * p.i + i];
                    wk[static_cast<size_t>(i) * kk + t] = v;
                    sumSq += v * v;
                }
            }
            double const demod = c.demodulate ? 1.0 / std::sqrt(sumSq + 1e-8) : 1.0;
            std::vector<double> img;
            if (c.up == 1)
            {
                img.assign(static_cast<size_t>(outH) * outW, 0.0);
                int32_t const pad = p.k / 2;
                for (int32_t y = 0; y < p.h; ++y)
                {
                    for (int32_t xx = 0; xx < p.w; ++xx)
                    {
                        double acc = 0.0;
                        for (int32_t i = 0; i < p.i; ++i)
                        {
                            for (int32_t kh = 0; kh < p.k; ++kh)
                            {
                                for (int32_t kw = 0; kw < p.k; ++kw)
                                {
                                    int32_t const sy = y + kh - pad;
                                    int32_t const sx = xx + kw - pad;
                                    if (sy >= 0 && sy < p.h && sx >= 0 && sx < p.w)
                                    {
                                        acc += wk[static_cast<size_t>(i) * kk + kh * p.k + kw]
                                            * p.x[((static_cast<size_t>(n) * p.i + i) * p.h + sy) * p.w + sx];
                                    }
                                }
                            }
                        }
                        img[static_cast<size_t>(y) * outW + xx] = acc;
                    }
                }
            }
            else
            {
                // Transposed conv, stride 2: scatter every input sample through the kernel.
                int32_t const th = 2 * p.h + p.k - 2;
                int32_t const tw = 2 * p.w + p.k - 2;
                std::vector<double> t(static_cast<size_t>(th) * tw, 0.0);
                for (int32_t i = 0; i < p.i; ++i)
                {
                    for (int32_t y = 0; y < p.h; ++y)
                    {
                        for (int32_t xx = 0; xx < p.w; ++xx)
                        {
                            double const v = p.x[((static_cast<size_t>(n) * p.i + i) * p.h + y) * p.w + xx];
                            for (int32_t kh = 0; kh < p.k; ++kh)
                            {
                                for (int32_t kw = 0; kw < p.k; ++kw)
                                {
                                    t[static_cast<size_t>(2 * y + kh) * tw + 2 * xx + kw]
                                        += v * wk[static_cast<size_t>(i) * kk + kh * p.k + kw];
                                }
                            }
                        }
                    }
                }
                int32_t const pp = (fs - 2) - (p.k - 1);
                int32_t const pad0 = pyFloorDiv(pp + 1, 2) + 1;
                img = upfirdnReference(t, th, tw, pad0, outH, outW, c.filter, fs);
            }
            std::vector<double> skipUp;
            if (c.hasSkip)
            {
                int32_t const sh = outH / 2;
                int32_t const sw = outW / 2;
                std::vector<double> z(static_cast<size_t>(outH) * outW, 0.0);
                for (int32_t y = 0; y < sh; ++y)
                {
                    for (int32_t xx = 0; xx < sw; ++xx)
                    {
                        z[static_cast<size_t>(2 * y) * outW + 2 * xx]
                            = p.skip[((static_cast<size_t>(n) * p.o + o) * sh + y) * sw + xx];
                    }
                }
                skipUp = upfirdnReference(z, outH, outW, (fs + 1) / 2, outH, outW, c.filter, fs);
            }
            for (int32_t y = 0; y < outH; ++y)
            {
                for (int32_t xx = 0; xx < outW; ++xx)
                {
                    size_t const pix = static_cast<size_t>(y) * outW + xx;
                    double v = img[pix] * demod;
                    if (c.hasNoise)
                    {
                        int32_t const nn = p.noiseBatch == 1 ? 0 : n;
                        v += p.noise[static_cast<size_t>(nn) * outH * outW + pix];
                    }
                    if (c.hasBias)
                    {
                        v += p.bias[o];
                    }
                    if (c.act == 1 && v < 0)
                    {
                        v *= c.alpha;
                    }
                    v *= c.gain;
                    if (c.clamp >= 0)
                    {
                        v = std::min<double>(std::max<double>(v, -c.clamp), c.clamp);
                    }
                    if (c.hasSkip)
                    {
                        v += skipUp[pix];
                    }
                    out[(static_cast<size_t>(n) * p.o + o) * outH * outW + pix] = v;
                }
            }
        }
    }
    return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------------------------

void checkIdentity(IPluginCreatorV3One* creator)
{
    InterfaceInfo const info = creator->getInterfaceInfo();
    check(std::strcmp(info.kind, "PLUGIN CREATOR_V3ONE") == 0 && info.major == 1, "creator_interface_v3one",
        std::string("kind ") + info.kind);
    check(std::strcmp(creator->getPluginName(), "ModulatedConv2d") == 0, "creator_name", creator->getPluginName());
    check(std::strcmp(creator->getPluginVersion(), "1") == 0, "creator_version", creator->getPluginVersion());
    check(std::strcmp(creator->getPluginNamespace(), "stylecast") == 0, "creator_namespace",
        creator->getPluginNamespace());

    PluginFieldCollection const* names = creator->getFieldNames();
    std::map<std::string, PluginFieldType> expected{{"demodulate", PluginFieldType::kINT32},
        {"up", PluginFieldType::kINT32}, {"act", PluginFieldType::kINT32}, {"alpha", PluginFieldType::kFLOAT32},
        {"gain", PluginFieldType::kFLOAT32}, {"clamp", PluginFieldType::kFLOAT32},
        {"has_noise", PluginFieldType::kINT32}, {"has_bias", PluginFieldType::kINT32},
        {"has_skip", PluginFieldType::kINT32}, {"resample_filter", PluginFieldType::kFLOAT32},
        {"filter_size", PluginFieldType::kINT32}};
    bool ok = names != nullptr && names->nbFields == static_cast<int32_t>(expected.size());
    std::string why;
    for (int32_t i = 0; ok && i < names->nbFields; ++i)
    {
        auto it = expected.find(names->fields[i].name);
        if (it == expected.end() || it->second != names->fields[i].type)
        {
            ok = false;
            why = std::string("unexpected field ") + names->fields[i].name;
        }
    }
    check(ok, "creator_field_names", why);
}

void checkCreationAndSerialisation(IPluginCreatorV3One* creator, CapturingLogger& logger)
{
    LayerConfig cfg;
    cfg.up = 2;
    cfg.clamp = 256.0F;
    cfg.filter = blurFilter();
    FieldBuilder fb = fieldsFor(cfg);
    IPluginV3* plugin = creator->createPlugin("conv_up", fb.collection(), TensorRTPhase::kBUILD);
    check(plugin != nullptr, "create_all_fields", logger.mLast);
    if (plugin == nullptr)
    {
        return;
    }
    InterfaceInfo const info = plugin->getInterfaceInfo();
    check(std::strcmp(info.kind, "PLUGIN") == 0, "plugin_interface_v3");
    check(core(plugin) != nullptr && build(plugin) != nullptr && runtime(plugin) != nullptr, "capabilities");
    check(std::strcmp(core(plugin)->getInterfaceInfo().kind, "PLUGIN_V3ONE_CORE") == 0
            && std::strcmp(build(plugin)->getInterfaceInfo().kind, "PLUGIN_V3ONE_BUILD") == 0
            && std::strcmp(runtime(plugin)->getInterfaceInfo().kind, "PLUGIN_V3ONE_RUNTIME") == 0,
        "capability_kinds");
    check(std::strcmp(core(plugin)->getPluginName(), "ModulatedConv2d") == 0
            && std::strcmp(core(plugin)->getPluginVersion(), "1") == 0
            && std::strcmp(core(plugin)->getPluginNamespace(), "stylecast") == 0,
        "plugin_identity");

    auto const fields = snapshot(runtime(plugin)->getFieldsToSerialize());
    std::map<std::string, std::vector<double>> expected{{"demodulate", {1}}, {"up", {2}}, {"act", {1}},
        {"alpha", {static_cast<double>(0.2F)}}, {"gain", {static_cast<double>(1.41421356F)}}, {"clamp", {256}},
        {"has_noise", {1}}, {"has_bias", {1}}, {"has_skip", {0}}, {"filter_size", {4}}};
    std::vector<double> filterValues;
    for (float v : cfg.filter)
    {
        filterValues.push_back(v);
    }
    expected["resample_filter"] = filterValues;
    check(fields == expected, "fields_parsed", describe(fields));

    // Serialisation round trip: the serialised fields recreate an identical plugin (runtime phase).
    PluginFieldCollection const* serialised = runtime(plugin)->getFieldsToSerialize();
    IPluginV3* restored = creator->createPlugin("conv_up", serialised, TensorRTPhase::kRUNTIME);
    check(restored != nullptr && snapshot(runtime(restored)->getFieldsToSerialize()) == fields,
        "serialisation_round_trip");

    // clone / attachToContext: equal fields, independent storage.
    IPluginV3* cloned = plugin->clone();
    IPluginV3* attached = runtime(plugin)->attachToContext(nullptr);
    bool const cloneOk = cloned != nullptr && cloned != plugin
        && snapshot(runtime(cloned)->getFieldsToSerialize()) == fields
        && runtime(cloned)->getFieldsToSerialize()->fields[0].data
            != runtime(plugin)->getFieldsToSerialize()->fields[0].data;
    delete plugin; // the clone must survive its source
    check(cloneOk && snapshot(runtime(cloned)->getFieldsToSerialize()) == fields, "clone");
    check(attached != nullptr && snapshot(runtime(attached)->getFieldsToSerialize()) == fields, "attach_to_context");
    delete restored;
    delete cloned;
    delete attached;

    // Unused filter is omitted from serialisation; to-RGB style fields.
    LayerConfig rgb;
    rgb.demodulate = 0;
    rgb.act = 0;
    rgb.gain = 1.0F;
    rgb.hasNoise = 0;
    rgb.hasSkip = 1;
    rgb.filter = blurFilter();
    FieldBuilder rgbFields = fieldsFor(rgb);
    IPluginV3* rgbPlugin = creator->createPlugin("to_rgb", rgbFields.collection(), TensorRTPhase::kBUILD);
    check(rgbPlugin != nullptr, "create_to_rgb", logger.mLast);
    delete rgbPlugin;

    LayerConfig plain;
    FieldBuilder plainFields = fieldsFor(plain);
    IPluginV3* plainPlugin = creator->createPlugin("conv", plainFields.collection(), TensorRTPhase::kBUILD);
    bool noFilterField = plainPlugin != nullptr;
    if (plainPlugin != nullptr)
    {
        noFilterField = snapshot(runtime(plainPlugin)->getFieldsToSerialize()).count("resample_filter") == 0;
    }
    check(noFilterField, "unused_filter_not_serialised");
    delete plainPlugin;
}

void checkFieldParsing(IPluginCreatorV3One* creator, CapturingLogger& logger)
{
    // Integer fields as int64 and float fields as float64 (how some ONNX parsers map attributes).
    LayerConfig cfg;
    cfg.up = 2;
    cfg.filter = blurFilter();
    FieldBuilder fb = fieldsFor(cfg);
    fb.addInt64("up", 2).addInt64("has_noise", 1).addDouble("alpha", 0.2).addDouble("gain", 1.41421356);
    std::vector<double> filter64(cfg.filter.begin(), cfg.filter.end());
    fb.addRaw("resample_filter", filter64.data(), filter64.size() * sizeof(double), PluginFieldType::kFLOAT64,
        static_cast<int32_t>(filter64.size()));
    IPluginV3* wide = creator->createPlugin("wide", fb.collection(), TensorRTPhase::kBUILD);
    FieldBuilder reference = fieldsFor(cfg);
    IPluginV3* narrow = creator->createPlugin("narrow", reference.collection(), TensorRTPhase::kBUILD);
    check(wide != nullptr && narrow != nullptr
            && snapshot(runtime(wide)->getFieldsToSerialize()) == snapshot(runtime(narrow)->getFieldsToSerialize()),
        "parse_int64_float64_fields", logger.mLast);
    delete wide;
    delete narrow;

    // Defaults: only the required bits (identity layer config) given.
    FieldBuilder minimal;
    minimal.addInt("up", 1).addFloat("gain", 1.0F);
    IPluginV3* defaults = creator->createPlugin("minimal", minimal.collection(), TensorRTPhase::kBUILD);
    bool defaultsOk = defaults != nullptr;
    if (defaults != nullptr)
    {
        auto const s = snapshot(runtime(defaults)->getFieldsToSerialize());
        defaultsOk = s.at("demodulate")[0] == 1 && s.at("act")[0] == 0 && s.at("clamp")[0] < 0
            && s.at("has_noise")[0] == 0 && s.at("has_bias")[0] == 0 && s.at("has_skip")[0] == 0;
    }
    check(defaultsOk, "parse_defaults", logger.mLast);
    delete defaults;

    // Invalid layers are refused with an error through TensorRT's logger, never a crash.
    struct Bad
    {
        char const* name;
        std::function<void(FieldBuilder&)> edit;
    };
    std::vector<Bad> const bad{
        {"reject_up_3", [](FieldBuilder& f) { f.addInt("up", 3); }},
        {"reject_act_5", [](FieldBuilder& f) { f.addInt("act", 5); }},
        {"reject_has_noise_2", [](FieldBuilder& f) { f.addInt("has_noise", 2); }},
        {"reject_up2_without_filter", [](FieldBuilder& f) { f.remove("resample_filter").addInt("filter_size", 0); }},
        {"reject_filter_length_mismatch", [](FieldBuilder& f) { f.addFloats("resample_filter", {0.5F, 0.5F}); }},
        {"reject_filter_too_large", [](FieldBuilder& f) {
             f.addInt("filter_size", 9).addFloats("resample_filter", std::vector<float>(81, 1.0F / 81));
         }},
        {"reject_non_integer_up", [](FieldBuilder& f) { f.addFloat("up", 1.5F); }},
        {"reject_nan_gain", [](FieldBuilder& f) { f.addFloat("gain", std::nanf("")); }},
        {"reject_char_field", [](FieldBuilder& f) { f.addRaw("up", "2", 1, PluginFieldType::kCHAR, 1); }},
    };
    for (auto const& b : bad)
    {
        FieldBuilder f = fieldsFor(cfg);
        b.edit(f);
        int32_t const errorsBefore = logger.mErrors;
        IPluginV3* p = creator->createPlugin(b.name, f.collection(), TensorRTPhase::kBUILD);
        check(p == nullptr && logger.mErrors > errorsBefore, b.name, p == nullptr ? "no error logged" : "accepted");
        delete p;
    }
    int32_t const errorsBefore = logger.mErrors;
    check(creator->createPlugin("null", nullptr, TensorRTPhase::kBUILD) == nullptr && logger.mErrors > errorsBefore,
        "reject_null_fields");
}

IPluginV3* makePlugin(IPluginCreatorV3One* creator, LayerConfig const& cfg)
{
    FieldBuilder fb = fieldsFor(cfg);
    return creator->createPlugin("layer", fb.collection(), TensorRTPhase::kBUILD);
}

void checkShapes(IPluginCreatorV3One* creator)
{
    struct Case
    {
        char const* name;
        LayerConfig cfg;
        int32_t o, k;
        int64_t h, w;
    };
    LayerConfig conv;
    LayerConfig up;
    up.up = 2;
    up.filter = blurFilter();
    LayerConfig rgb;
    rgb.demodulate = 0;
    rgb.act = 0;
    rgb.gain = 1.0F;
    rgb.hasNoise = 0;
    rgb.hasSkip = 1;
    rgb.filter = blurFilter();
    std::vector<Case> const cases{{"output_shape_up1", conv, 512, 3, 16, 16},
        {"output_shape_up2", up, 256, 3, 64, 32}, {"output_shape_to_rgb", rgb, 3, 1, 128, 128}};
    for (auto const& c : cases)
    {
        IPluginV3* plugin = makePlugin(creator, c.cfg);
        if (plugin == nullptr)
        {
            check(false, c.name, "plugin not created");
            continue;
        }
        FakeExprBuilder eb;
        FakeExpr const* batch = eb.makeSymbol("N");
        int32_t const inChannels = 64;
        std::vector<DimsExprs> in;
        auto shape = [&](std::vector<IDimensionExpr const*> const& d) {
            DimsExprs e{};
            e.nbDims = static_cast<int32_t>(d.size());
            for (size_t i = 0; i < d.size(); ++i)
            {
                e.d[i] = d[i];
            }
            in.push_back(e);
        };
        shape({batch, eb.makeConstant(inChannels), eb.makeConstant(c.h), eb.makeConstant(c.w)});
        shape({eb.makeConstant(c.o), eb.makeConstant(inChannels), eb.makeConstant(c.k), eb.makeConstant(c.k)});
        shape({batch, eb.makeConstant(inChannels)});
        int64_t const outH = c.h * c.cfg.up;
        int64_t const outW = c.w * c.cfg.up;
        if (c.cfg.hasNoise)
        {
            shape({eb.makeConstant(1), eb.makeConstant(1), eb.makeConstant(outH), eb.makeConstant(outW)});
        }
        if (c.cfg.hasBias)
        {
            shape({eb.makeConstant(c.o)});
        }
        if (c.cfg.hasSkip)
        {
            shape({batch, eb.makeConstant(c.o), eb.makeConstant(outH / 2), eb.makeConstant(outW / 2)});
        }
        DimsExprs out{};
        int32_t const status = build(plugin)->getOutputShapes(
            in.data(), static_cast<int32_t>(in.size()), nullptr, 0, &out, 1, eb);
        bool ok = status == 0 && out.nbDims == 4;
        std::string why = "status " + std::to_string(status);
        if (ok)
        {
            auto const* d0 = static_cast<FakeExpr const*>(out.d[0]);
            bool const batchSymbolic = !d0->isConstant();
            bool sizes = true;
            for (int64_t nValue : {1, 3, 8})
            {
                FakeExpr::Env const env{{"N", nValue}};
                sizes = sizes && d0->evaluate(env) == nValue
                    && static_cast<FakeExpr const*>(out.d[1])->evaluate(env) == c.o
                    && static_cast<FakeExpr const*>(out.d[2])->evaluate(env) == outH
                    && static_cast<FakeExpr const*>(out.d[3])->evaluate(env) == outW;
            }
            ok = batchSymbolic && sizes;
            why = "got [" + d0->text() + ", " + static_cast<FakeExpr const*>(out.d[1])->text() + ", "
                + static_cast<FakeExpr const*>(out.d[2])->text() + ", "
                + static_cast<FakeExpr const*>(out.d[3])->text() + "]";
        }
        check(ok, c.name, why);

        // Symbolic spatial size too (a fully dynamic export): H * 2 stays an expression.
        if (c.cfg.up == 2)
        {
            FakeExpr const* height = eb.makeSymbol("H");
            in[0].d[2] = height;
            DimsExprs outDyn{};
            int32_t const st = build(plugin)->getOutputShapes(
                in.data(), static_cast<int32_t>(in.size()), nullptr, 0, &outDyn, 1, eb);
            bool const dynOk = st == 0
                && static_cast<FakeExpr const*>(outDyn.d[2])->evaluate({{"N", 2}, {"H", 7}}) == 14;
            check(dynOk, "output_shape_symbolic_height");
        }

        // Wrong input count is refused.
        DimsExprs bad{};
        check(build(plugin)->getOutputShapes(in.data(), 2, nullptr, 0, &bad, 1, eb) != 0,
            std::string(c.name) + "_wrong_input_count");
        delete plugin;
    }
}

void checkBuildQueries(IPluginCreatorV3One* creator)
{
    LayerConfig cfg;
    cfg.up = 2;
    cfg.filter = blurFilter();
    IPluginV3* plugin = makePlugin(creator, cfg);
    if (plugin == nullptr)
    {
        check(false, "build_queries", "plugin not created");
        return;
    }
    IPluginV3OneBuild* b = build(plugin);
    check(b->getNbOutputs() == 1, "nb_outputs");

    DataType outType{};
    DataType const inFloat[5] = {DataType::kFLOAT, DataType::kFLOAT, DataType::kFLOAT, DataType::kFLOAT,
        DataType::kFLOAT};
    DataType const inHalf[5] = {DataType::kHALF, DataType::kHALF, DataType::kHALF, DataType::kHALF, DataType::kHALF};
    bool typesOk = b->getOutputDataTypes(&outType, 1, inFloat, 5) == 0 && outType == DataType::kFLOAT;
    typesOk = typesOk && b->getOutputDataTypes(&outType, 1, inHalf, 5) == 0 && outType == DataType::kHALF;
    check(typesOk, "output_data_types");

    // x, weight, styles, noise, bias, out
    std::vector<std::vector<int64_t>> const shapes{
        {-1, 8, 4, 4}, {6, 8, 3, 3}, {-1, 8}, {1, 1, 8, 8}, {6}, {-1, 6, 8, 8}};
    auto combo = [&](DataType t0, DataType tRest, TensorFormat fmt = TensorFormat::kLINEAR) {
        std::vector<DynamicPluginTensorDesc> io;
        for (size_t i = 0; i < shapes.size(); ++i)
        {
            io.push_back(dyn(shapes[i], i == 0 ? t0 : tRest, i == 0 ? TensorFormat::kLINEAR : fmt));
        }
        return io;
    };
    auto allPositions = [&](std::vector<DynamicPluginTensorDesc> const& io) {
        bool ok = true;
        for (int32_t pos = 0; pos < 6; ++pos)
        {
            ok = ok && b->supportsFormatCombination(pos, io.data(), 5, 1);
        }
        return ok;
    };
    check(allPositions(combo(DataType::kFLOAT, DataType::kFLOAT)), "format_fp32_linear");
    check(allPositions(combo(DataType::kHALF, DataType::kHALF)), "format_fp16_linear");
    auto int8 = combo(DataType::kINT8, DataType::kINT8);
    check(!b->supportsFormatCombination(0, int8.data(), 5, 1), "format_reject_int8");
    auto bf16 = combo(DataType::kBF16, DataType::kBF16);
    check(!b->supportsFormatCombination(0, bf16.data(), 5, 1), "format_reject_bf16");
    auto mixed = combo(DataType::kFLOAT, DataType::kHALF);
    bool mixedRejected = true;
    for (int32_t pos = 1; pos < 6; ++pos)
    {
        mixedRejected = mixedRejected && !b->supportsFormatCombination(pos, mixed.data(), 5, 1);
    }
    check(mixedRejected, "format_reject_mixed_types");
    auto chw32 = combo(DataType::kHALF, DataType::kHALF);
    chw32[0].desc.format = TensorFormat::kCHW32;
    check(!b->supportsFormatCombination(0, chw32.data(), 5, 1), "format_reject_non_linear");
    check(!b->supportsFormatCombination(6, mixed.data(), 5, 1), "format_reject_out_of_range_pos");

    // Workspace: demod scratch (O*I + N*O floats) + the transposed-conv image N*O*(2H+1)*(2W+1), for max N.
    int64_t const maxBatch = 16;
    auto const kF32 = DataType::kFLOAT;
    auto const kLIN = TensorFormat::kLINEAR;
    std::vector<DynamicPluginTensorDesc> in{dyn({1, 8, 4, 4}, kF32, kLIN, {maxBatch, 8, 4, 4}),
        dyn({6, 8, 3, 3}), dyn({1, 8}, kF32, kLIN, {maxBatch, 8}), dyn({1, 1, 8, 8}),
        dyn({6})};
    std::vector<DynamicPluginTensorDesc> out{dyn({1, 6, 8, 8}, kF32, kLIN, {maxBatch, 6, 8, 8})};
    size_t const expected = alignUp(4 * 6 * 8) + alignUp(4 * maxBatch * 6) + alignUp(4 * maxBatch * 6 * 9 * 9);
    size_t const got = b->getWorkspaceSize(in.data(), 5, out.data(), 1);
    check(got == expected, "workspace_size_max_batch", std::to_string(got) + " != " + std::to_string(expected));

    // configurePlugin accepts consistent shapes with a dynamic batch and refuses inconsistent ones.
    check(b->configurePlugin(in.data(), 5, out.data(), 1) == 0, "configure_dynamic_batch");
    std::vector<DynamicPluginTensorDesc> badChannels = in;
    badChannels[1] = dyn({6, 7, 3, 3});
    check(b->configurePlugin(badChannels.data(), 5, out.data(), 1) != 0, "configure_reject_channel_mismatch");
    check(b->configurePlugin(in.data(), 4, out.data(), 1) != 0, "configure_reject_input_count");
    std::vector<DynamicPluginTensorDesc> badNoise = in;
    badNoise[3] = dyn({1, 1, 4, 4});
    check(b->configurePlugin(badNoise.data(), 5, out.data(), 1) != 0, "configure_reject_noise_size");

    // onShapeChange with concrete shapes.
    std::vector<PluginTensorDesc> concrete;
    for (auto const& d : in)
    {
        PluginTensorDesc p = d.desc;
        if (p.dims.d[0] == 1 && (p.dims.nbDims == 2 || p.dims.d[1] == 8))
        {
            p.dims.d[0] = 3;
        }
        concrete.push_back(p);
    }
    PluginTensorDesc outDesc = out[0].desc;
    outDesc.dims.d[0] = 3;
    check(runtime(plugin)->onShapeChange(concrete.data(), 5, &outDesc, 1) == 0, "on_shape_change");
    concrete[2].dims.d[0] = 2;
    check(runtime(plugin)->onShapeChange(concrete.data(), 5, &outDesc, 1) != 0, "on_shape_change_reject_batch");
    check(b->getTimingCacheID() != nullptr && std::strstr(b->getTimingCacheID(), "up=2") != nullptr,
        "timing_cache_id");
    delete plugin;
}

// ---------------------------------------------------------------------------------------------------------------
// enqueue on host buffers (CPU-emulation build only)
// ---------------------------------------------------------------------------------------------------------------

void checkEnqueue(IPluginCreatorV3One* creator, std::string const& name, Problem p, bool half)
{
    std::mt19937 rng(1234);
    std::normal_distribution<double> normal(0.0, 1.0);
    auto fill = [&](std::vector<double>& v, size_t count, double scale) {
        v.resize(count);
        for (auto& e : v)
        {
            e = normal(rng) * scale;
            if (half)
            {
                e = __half2float(__float2half(static_cast<float>(e))); // the reference sees the rounded inputs
            }
            else
            {
                e = static_cast<float>(e);
            }
        }
    };
    LayerConfig const& c = p.cfg;
    int32_t const outH = p.h * c.up;
    int32_t const outW = p.w * c.up;
    fill(p.x, static_cast<size_t>(p.n) * p.i * p.h * p.w, 1.0);
    fill(p.weight, static_cast<size_t>(p.o) * p.i * p.k * p.k, 1.0 / std::sqrt(p.i * p.k * p.k));
    fill(p.styles, static_cast<size_t>(p.n) * p.i, 1.0);
    if (c.hasNoise)
    {
        fill(p.noise, static_cast<size_t>(p.noiseBatch) * outH * outW, 0.1);
    }
    if (c.hasBias)
    {
        fill(p.bias, static_cast<size_t>(p.o), 0.2);
    }
    if (c.hasSkip)
    {
        fill(p.skip, static_cast<size_t>(p.n) * p.o * (outH / 2) * (outW / 2), 1.0);
    }
    std::vector<double> const expected = referenceForward(p);

    IPluginV3* plugin = makePlugin(creator, c);
    if (plugin == nullptr)
    {
        check(false, name, "plugin not created");
        return;
    }
    DataType const type = half ? DataType::kHALF : DataType::kFLOAT;
    std::vector<std::vector<uint8_t>> buffers;
    std::vector<PluginTensorDesc> descs;
    auto add = [&](std::vector<double> const& values, std::vector<int64_t> const& shape) {
        std::vector<uint8_t> bytes(values.size() * (half ? 2 : 4));
        for (size_t i = 0; i < values.size(); ++i)
        {
            if (half)
            {
                __half const h = __float2half(static_cast<float>(values[i]));
                std::memcpy(bytes.data() + 2 * i, &h, 2);
            }
            else
            {
                float const f = static_cast<float>(values[i]);
                std::memcpy(bytes.data() + 4 * i, &f, 4);
            }
        }
        buffers.push_back(std::move(bytes));
        descs.push_back(dyn(shape, type).desc);
    };
    add(p.x, {p.n, p.i, p.h, p.w});
    add(p.weight, {p.o, p.i, p.k, p.k});
    add(p.styles, {p.n, p.i});
    if (c.hasNoise)
    {
        add(p.noise, {p.noiseBatch, 1, outH, outW});
    }
    if (c.hasBias)
    {
        add(p.bias, {p.o});
    }
    if (c.hasSkip)
    {
        add(p.skip, {p.n, p.o, outH / 2, outW / 2});
    }
    size_t const outCount = static_cast<size_t>(p.n) * p.o * outH * outW;
    std::vector<uint8_t> outBytes(outCount * (half ? 2 : 4), 0xFF); // NaN pattern: unwritten outputs show up
    PluginTensorDesc const outDesc = dyn({p.n, p.o, outH, outW}, type).desc;

    std::vector<DynamicPluginTensorDesc> dynIn;
    for (auto const& d : descs)
    {
        DynamicPluginTensorDesc dd{};
        dd.desc = d;
        dd.min = dd.opt = dd.max = d.dims;
        dynIn.push_back(dd);
    }
    DynamicPluginTensorDesc dynOut{};
    dynOut.desc = outDesc;
    dynOut.min = dynOut.opt = dynOut.max = outDesc.dims;
    int32_t const nbInputs = static_cast<int32_t>(descs.size());
    size_t const wsBytes = build(plugin)->getWorkspaceSize(dynIn.data(), nbInputs, &dynOut, 1);
    std::vector<float> workspace(wsBytes / sizeof(float) + 64, std::nanf(""));
    std::vector<void const*> inputs;
    int32_t status = runtime(plugin)->onShapeChange(descs.data(), nbInputs, &outDesc, 1);
#if defined(STYLECAST_HARNESS_GPU)
    // Device copies of every buffer; the workspace and output start as NaN patterns, as on the host.
    std::vector<void*> deviceBuffers;
    auto toDevice = [&](void const* host, size_t bytes, int32_t fillByte) {
        void* ptr{nullptr};
        if (cudaMalloc(&ptr, std::max<size_t>(bytes, 1)) != cudaSuccess)
        {
            return static_cast<void*>(nullptr);
        }
        deviceBuffers.push_back(ptr);
        if (host != nullptr)
        {
            cudaMemcpy(ptr, host, bytes, cudaMemcpyHostToDevice);
        }
        else
        {
            cudaMemset(ptr, fillByte, bytes);
        }
        return ptr;
    };
    for (auto const& b : buffers)
    {
        inputs.push_back(toDevice(b.data(), b.size(), 0));
    }
    void* deviceOut = toDevice(nullptr, outBytes.size(), 0xFF);
    void* deviceWorkspace = toDevice(nullptr, wsBytes, 0xFF);
    void* outputs[1] = {deviceOut};
    cudaStream_t stream{nullptr};
    cudaStreamCreate(&stream);
    if (status == 0)
    {
        status = runtime(plugin)->enqueue(descs.data(), &outDesc, inputs.data(), outputs, deviceWorkspace, stream);
    }
    cudaError_t const syncStatus = cudaStreamSynchronize(stream);
    if (status == 0 && syncStatus != cudaSuccess)
    {
        status = static_cast<int32_t>(syncStatus);
    }
    cudaMemcpy(outBytes.data(), deviceOut, outBytes.size(), cudaMemcpyDeviceToHost);
    cudaStreamDestroy(stream);
    for (void* ptr : deviceBuffers)
    {
        cudaFree(ptr);
    }
#else
    for (auto const& b : buffers)
    {
        inputs.push_back(b.data());
    }
    void* outputs[1] = {outBytes.data()};
    if (status == 0)
    {
        status = runtime(plugin)->enqueue(descs.data(), &outDesc, inputs.data(), outputs, workspace.data(), nullptr);
    }
#endif
    double maxErr = 0.0;
    double scale = 0.0;
    bool finite = true;
    for (size_t i = 0; i < outCount; ++i)
    {
        float got{0.0F};
        if (half)
        {
            __half h;
            std::memcpy(&h, outBytes.data() + 2 * i, 2);
            got = __half2float(h);
        }
        else
        {
            std::memcpy(&got, outBytes.data() + 4 * i, 4);
        }
        finite = finite && std::isfinite(got);
        maxErr = std::max(maxErr, std::fabs(got - expected[i]));
        scale = std::max(scale, std::fabs(expected[i]));
    }
    // fp32: float32 accumulation over I*k*k terms; fp16: output rounding (2^-11 relative) dominates.
    double const tolerance = (half ? 2e-3 : 1e-5) * std::max(scale, 1.0);
    std::ostringstream why;
    why << "status " << status << " max|err| " << maxErr << " scale " << scale << " finite " << finite;
    check(status == 0 && finite && maxErr <= tolerance, name + (half ? "_fp16" : "_fp32"), why.str());
    delete plugin;
}

void checkEnqueueAll(IPluginCreatorV3One* creator)
{
    for (bool half : {false, true})
    {
        Problem conv{3, 12, 70, 9, 7, 3, LayerConfig{}, 1, {}, {}, {}, {}, {}, {}};
        checkEnqueue(creator, "enqueue_up1_noise_bias_lrelu", conv, half);

        Problem up{2, 10, 9, 5, 6, 3, LayerConfig{}, 2, {}, {}, {}, {}, {}, {}};
        up.cfg.up = 2;
        up.cfg.clamp = 0.8F;
        up.cfg.filter = blurFilter();
        checkEnqueue(creator, "enqueue_up2_clamp_per_sample_noise", up, half);

        Problem plain{2, 6, 5, 6, 6, 3, LayerConfig{}, 0, {}, {}, {}, {}, {}, {}};
        plain.cfg.demodulate = 0;
        plain.cfg.act = 0;
        plain.cfg.gain = 1.0F;
        plain.cfg.hasNoise = 0;
        plain.cfg.hasBias = 0;
        checkEnqueue(creator, "enqueue_up1_plain", plain, half);

        Problem rgb{2, 40, 3, 8, 6, 1, LayerConfig{}, 0, {}, {}, {}, {}, {}, {}};
        rgb.cfg.demodulate = 0;
        rgb.cfg.act = 0;
        rgb.cfg.gain = 1.0F;
        rgb.cfg.clamp = 0.5F;
        rgb.cfg.hasNoise = 0;
        rgb.cfg.hasSkip = 1;
        rgb.cfg.filter = blurFilter();
        checkEnqueue(creator, "enqueue_to_rgb_skip_clamp", rgb, half);

#if defined(STYLECAST_HARNESS_GPU)
        // Several tiles along every GEMM axis (O > 64, pixels > 64, K slices > 16), odd sizes, batch 5.
        Problem bigConv{5, 96, 130, 17, 23, 3, LayerConfig{}, 5, {}, {}, {}, {}, {}, {}};
        bigConv.cfg.clamp = 1.5F;
        checkEnqueue(creator, "enqueue_large_up1", bigConv, half);
        Problem bigUp{3, 80, 72, 13, 9, 3, LayerConfig{}, 1, {}, {}, {}, {}, {}, {}};
        bigUp.cfg.up = 2;
        bigUp.cfg.filter = blurFilter();
        checkEnqueue(creator, "enqueue_large_up2", bigUp, half);
        Problem bigRgb{4, 520, 3, 32, 32, 1, LayerConfig{}, 0, {}, {}, {}, {}, {}, {}};
        bigRgb.cfg.demodulate = 0;
        bigRgb.cfg.act = 0;
        bigRgb.cfg.gain = 1.0F;
        bigRgb.cfg.hasNoise = 0;
        bigRgb.cfg.hasSkip = 1;
        bigRgb.cfg.filter = blurFilter();
        checkEnqueue(creator, "enqueue_large_to_rgb", bigRgb, half);
#endif
    }
}

} // namespace

int main(int argc, char** argv)
{
    if (argc < 2)
    {
        std::fprintf(stderr, "usage: %s <plugin library> [--enqueue]\n", argv[0]);
        return 2;
    }
    bool const runEnqueue = argc > 2 && std::strcmp(argv[2], "--enqueue") == 0;
    void* handle = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    check(handle != nullptr, "dlopen", handle == nullptr ? dlerror() : "");
    if (handle == nullptr)
    {
        std::printf("%d passed, %d failed\n", gPassed, gFailed);
        return 1;
    }
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    using SetLoggerFinder = void (*)(ILoggerFinder*);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(handle, "getCreators"));
    auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(handle, "setLoggerFinder"));
    check(getCreators != nullptr && setLoggerFinder != nullptr, "entry_points_exported");
    if (getCreators == nullptr || setLoggerFinder == nullptr)
    {
        std::printf("%d passed, %d failed\n", gPassed, gFailed);
        return 1;
    }
    LoggerFinder finder;
    setLoggerFinder(&finder);
    int32_t nbCreators = 0;
    IPluginCreatorInterface* const* creators = getCreators(nbCreators);
    check(nbCreators == 1 && creators != nullptr && creators[0] != nullptr, "one_creator");
    auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);

    checkIdentity(creator);
    checkCreationAndSerialisation(creator, finder.mLogger);
    checkFieldParsing(creator, finder.mLogger);
    checkShapes(creator);
    checkBuildQueries(creator);
    if (runEnqueue)
    {
        checkEnqueueAll(creator);
    }
    setLoggerFinder(nullptr);
    std::printf("%d passed, %d failed\n", gPassed, gFailed);
    return gFailed == 0 ? 0 : 1;
}
