using System.Text;

namespace OffloadRpc.Generators;

/// <summary>FNV-1a hashes of canonical signature text: stable across compilers, machines and builds.</summary>
internal static class ContractHash
{
    /// <summary>A method id: positive, never zero.</summary>
    public static int MethodId(string canonicalSignature)
    {
        uint hash = 2166136261;
        foreach (byte b in Encoding.UTF8.GetBytes(canonicalSignature))
        {
            hash = (hash ^ b) * 16777619;
        }

        int id = (int)(hash & 0x7FFF_FFFF);
        return id == 0 ? 1 : id;
    }

    public static ulong Contract(string canonicalContract)
    {
        ulong hash = 14695981039346656037;
        foreach (byte b in Encoding.UTF8.GetBytes(canonicalContract))
        {
            hash = (hash ^ b) * 1099511628211;
        }

        return hash;
    }
}
