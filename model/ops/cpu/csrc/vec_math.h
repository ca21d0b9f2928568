/* Elementwise functions the compiled loops need, written so that a loop calling them
 * vectorises (build with -fno-trapping-math, so the clamps become vector min/max).
 *
 * exp_f32: e^x for float x, to about 1.5 ulp (Cody-Waite reduction by ln 2, Cephes'
 * degree-5 polynomial, the power of two assembled from its bits); x is clamped to
 * [-87, 88], so the result is a normal float or, above 88, e^88.
 */
#include <stdint.h>
#include <string.h>

static inline float exp_f32(float x) {
    x = x > 88.0f ? 88.0f : x;
    x = x < -87.0f ? -87.0f : x;
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln 2) */
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = p * (r * r) + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}
